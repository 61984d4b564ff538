"""Workflow of ``losa prune``: sequential pruning with a criterion and per-block rates.

load model -> calibration windows -> for each block (on the outputs of the pruned blocks
before it): collect fp32 statistics of every linear layer's inputs, prune each layer to the
block's rate (or N:M), re-run the block -> save the model, tokenizer and manifest atomically.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .allocation import Allocation, owl_allocation, rmi_allocation
from .atomic import atomic_folder, check_output
from .calibration import ProgressFn, sequential_blocks
from .config import PruneConfig, load_per_layer, to_dict
from .data import bos_token_to_prepend, read_documents, sample_windows, token_stream
from .errors import ConfigError, NumericalError
from .manifest import build_manifest, peak_rss_mib, write_manifest
from .masks import layerwise_mask, nm_mask, parse_nm, rowwise_mask
from .modeling import (
    LoadedModel,
    find_blocks,
    find_linears,
    load_model,
    max_context,
    resolve_device,
    save_model,
    sparsity_report,
)
from .rmi import DEFAULT_BETA, default_delta
from .sparsegpt import CholeskyError, HessianAccumulator, sparsegpt_prune
from .wanda import InputNormAccumulator, magnitude_scores, wanda_scores


@dataclass
class PruneResult:
    """What ``losa prune`` did, for the summary table, ``--json`` and the manifest."""

    out: str
    method: str
    pattern: str | None
    target_sparsity: float
    per_block_rates: list[float]
    per_block_sparsity: list[float]
    per_layer_sparsity: dict[str, float]
    global_sparsity: float
    mask_checksum: str
    nsamples: int
    seqlen: int
    calibration_tokens: int
    wall_time_s: float
    peak_memory_mib: float
    device: str
    allocation: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def block_rates(config: PruneConfig, loaded: LoadedModel, windows: torch.Tensor | None, device: torch.device,
                progress: ProgressFn | None = None) -> Allocation:
    """Per-block target rates: N:M's n/m, an explicit file, RMI, OWL, or uniform ``--sparsity``."""
    num_blocks = len(find_blocks(loaded.model))
    if config.pattern:
        n, m = parse_nm(config.pattern)
        return Allocation("nm", [n / m] * num_blocks)
    if config.per_layer:
        return Allocation("file", load_per_layer(config.per_layer, num_blocks), {"file": config.per_layer})
    if config.allocation == "rmi":
        delta = config.delta if config.delta is not None else default_delta(config.sparsity)
        beta = config.beta if config.beta is not None else DEFAULT_BETA[config.method]
        return rmi_allocation(loaded.model, windows[: config.rmi_samples], device, config.sparsity, delta, beta, progress)
    if config.allocation == "owl":
        return owl_allocation(loaded.model, windows, device, config.sparsity, config.owl_lambda, config.owl_m, progress)
    return Allocation("uniform", [config.sparsity] * num_blocks)


def check_nm_widths(model: nn.Module, pattern: str) -> None:
    """Every pruned layer's input width must be a multiple of M."""
    _, m = parse_nm(pattern)
    for index, block in enumerate(find_blocks(model)):
        for name, linear in find_linears(block).items():
            if linear.in_features % m:
                raise ConfigError(
                    f"--pattern {pattern}: block {index} {name} has input width {linear.in_features}, not a multiple of {m}"
                )


def calibration_windows(config: PruneConfig, loaded: LoadedModel, warnings: list[str]) -> torch.Tensor:
    """Sample the calibration windows, clipping ``--seqlen`` to the model's context."""
    calib = config.calibration
    seqlen = calib.seqlen
    limit = max_context(loaded.model)
    if limit is not None and seqlen > limit:
        warnings.append(f"--seqlen {seqlen} exceeds the model's context {limit}; using {limit}")
        seqlen = limit
    stream = token_stream(loaded.tokenizer, read_documents(calib.calib))
    bos = bos_token_to_prepend(loaded.tokenizer)
    return sample_windows(stream, calib.nsamples, seqlen, calib.seed, bos, calib.calib)


def _select_mask(scores: torch.Tensor, rate: float, nm: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    if nm is not None:
        return nm_mask(scores, *nm)
    return rowwise_mask(scores, rate) if per_row else layerwise_mask(scores, rate)


@torch.no_grad()
def _prune_linear(linear: nn.Linear, method: str, rate: float, nm, stats, config: PruneConfig, where: str) -> list[str]:
    """Prune one layer in place; returns warnings."""
    weight = linear.weight
    if method == "sparsegpt":
        try:
            result = sparsegpt_prune(weight, stats.hessian, rate, nm, config.blocksize, config.damp)
        except CholeskyError as exc:
            raise NumericalError(f"{where}: {exc}; raise --damp (now {config.damp:g}) or use more calibration data") from None
        weight.copy_(result.weight.to(weight.dtype))
        return [f"{where}: {w}" for w in result.warnings]
    if method == "wanda":
        scores = wanda_scores(weight, stats.norms())
    else:
        scores = magnitude_scores(weight)
    mask = _select_mask(scores, rate, nm, per_row=(method == "wanda"))
    weight.masked_fill_(mask, 0.0)
    return []


def prune_model(
    loaded: LoadedModel,
    config: PruneConfig,
    rates: list[float],
    windows: torch.Tensor | None,
    device: torch.device,
    progress: ProgressFn | None = None,
) -> list[str]:
    """Prune every block's linear layers in place, sequentially; returns warnings."""
    nm = parse_nm(config.pattern) if config.pattern else None
    method = config.method
    warnings: list[str] = []
    blocks = find_blocks(loaded.model)
    if windows is None:  # magnitude needs no activations
        for index, block in enumerate(blocks):
            for name, linear in find_linears(block).items():
                _prune_linear(linear, method, rates[index], nm, None, config, f"block {index} {name}")
            if progress:
                progress("blocks", index + 1, len(blocks))
        return warnings
    accumulator = HessianAccumulator if method == "sparsegpt" else InputNormAccumulator
    for step in sequential_blocks(loaded.model, windows, device, progress):
        stats: dict[str, object] = {}

        def observer(name: str, linear: nn.Linear):
            stats[name] = accumulator(linear.in_features, device)
            return stats[name].add

        step.observe_linear_inputs(observer)
        for name, linear in find_linears(step.block).items():
            warnings += _prune_linear(linear, method, rates[step.index], nm, stats[name], config, f"block {step.index} {name}")
        del stats
    return warnings


def run_prune(config: PruneConfig, progress: ProgressFn | None = None) -> PruneResult:
    """``losa prune``: validate, load, prune, save atomically; never touches the input model."""
    config.validate()
    out = check_output(config.out, config.force, inputs=(config.model,))
    started = time.perf_counter()
    device = resolve_device(config.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loaded = load_model(config.model, config.dtype, config.trust_remote_code)
    if config.pattern:
        check_nm_widths(loaded.model, config.pattern)
    warnings: list[str] = []
    needs_data = config.method != "magnitude" or config.allocation != "uniform"
    windows = calibration_windows(config, loaded, warnings) if needs_data else None
    allocation = block_rates(config, loaded, windows, device, progress)
    rates = allocation.rates
    activations = None if config.method == "magnitude" else windows  # magnitude needs no activations
    warnings += prune_model(loaded, config, rates, activations, device, progress)
    per_layer, per_block, global_sparsity, checksum = sparsity_report(loaded.model)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mib()
    result = PruneResult(
        out=str(out),
        method=config.method,
        pattern=config.pattern,
        target_sparsity=sum(rates) / len(rates),
        per_block_rates=rates,
        per_block_sparsity=per_block,
        per_layer_sparsity=per_layer,
        global_sparsity=global_sparsity,
        mask_checksum=checksum,
        nsamples=0 if windows is None else int(windows.shape[0]),
        seqlen=0 if windows is None else int(windows.shape[1]),
        calibration_tokens=0 if windows is None else int(windows.numel()),
        wall_time_s=0.0,
        peak_memory_mib=peak,
        device=str(device),
        allocation={k: v for k, v in asdict(allocation).items() if k != "rates"},
        warnings=warnings,
    )
    with atomic_folder(out) as staging:
        save_model(loaded, staging)
        result.wall_time_s = time.perf_counter() - started
        manifest = build_manifest(
            "prune",
            inputs={"model": loaded.source.describe(), "calibration": config.calibration.calib},
            settings=to_dict(config),
            results={k: v for k, v in result.__dict__.items() if k != "out"},
            parent_folder=Path(loaded.source.location) if loaded.source.is_local else None,
        )
        write_manifest(staging, manifest)
    return result
