"""Workflow of ``losa prune``: sequential pruning with a criterion and per-block rates.

load model -> calibration windows -> per-block rates (uniform, file, RMI, OWL, N:M) -> prune
block by block (``pruning.py``) -> with ``--prune-lm-head``, the output head at the blocks' mean
rate (untied from the embedding) -> save the model, tokenizer and manifest atomically.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..core.activations import activation_bytes
from ..core.atomic import atomic_folder, check_output
from ..core.config import to_dict
from ..core.manifest import build_manifest, peak_memory_mib, write_manifest
from ..core.modeling import (
    DTYPES,
    LoadedModel,
    SparsityTally,
    find_blocks,
    load_model,
    load_model_skeleton,
    resolve_device,
    save_model,
    sparsity_report,
)
from ..core.offload import MappedBlocks, ShardWriter, available_memory_bytes, module_name, should_stream
from ..core.sequential import ProgressFn
from .allocation import RateRule, block_rates
from .config import Method, PruneConfig, parse_nm
from .pruning import Criterion, calibration_windows, check_nm_widths, prune_blocks, prune_lm_head, untie_lm_head
from .reconstruction import Reconstruction, Reconstructor


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
    low_memory: bool = False
    activations_on_disk: bool = False
    allocation: dict = field(default_factory=dict)
    lm_head: dict | None = None
    #: ``--reconstruct``: its settings, each block's first and last training loss, the time it took
    reconstruction: dict | None = None
    warnings: list[str] = field(default_factory=list)


def _prune_head(model: torch.nn.Module, criterion: Criterion, rate: float, windows: torch.Tensor | None,
                device: torch.device, warnings: list[str]) -> dict:
    """``--prune-lm-head``: untie the head from the embedding if needed, prune it at the blocks' mean rate."""
    untied = untie_lm_head(model)
    warnings += prune_lm_head(model, criterion, rate, windows, device)
    weight = model.get_output_embeddings().weight
    return {
        "untied_from_embedding": untied,
        "rate": rate,
        "sparsity": float((weight == 0).float().mean()),
        "note": "the head is a separate copy of the embedding matrix, saved beside it" if untied else "already untied",
    }


def _low_memory(config: PruneConfig) -> bool:
    """``--low-memory`` as asked, or (unset) when the model would take over half the free memory."""
    if config.low_memory is not None:
        return config.low_memory
    if config.prune_lm_head:
        return False  # the head's inputs come from a whole-model forward pass
    folder = Path(config.model).expanduser()
    return folder.is_dir() and should_stream(folder, DTYPES[config.dtype])


@dataclass
class _Streamed:
    """``--low-memory``: each pruned block is counted and written to its shard as the pass leaves it."""

    loaded: LoadedModel
    staging: Path
    dtype: torch.dtype

    def __post_init__(self) -> None:
        blocks = find_blocks(self.loaded.model)
        self.prefix = module_name(self.loaded.model, blocks)
        self.tally = SparsityTally()
        self.writer = ShardWriter(self.staging, self.prefix, len(blocks))

    def reader(self, keep: bool) -> MappedBlocks:
        return MappedBlocks(self.loaded.checkpoint, self.prefix, self.dtype, self._keep if keep else None)

    def _keep(self, index: int, block: torch.nn.Module) -> None:
        self.tally.add_block(index, block)
        self.writer.write_block(index, block)

    def save(self) -> None:
        self.writer.write_outside_blocks(self.loaded.model)
        self.writer.finish()
        self.loaded.model.config.save_pretrained(self.staging)
        if self.loaded.model.can_generate():
            self.loaded.model.generation_config.save_pretrained(self.staging)
        self.loaded.tokenizer.save_pretrained(self.staging)


@contextmanager
def _activation_folder(
    config: PruneConfig, model: torch.nn.Module, windows: torch.Tensor | None, out: Path
) -> Iterator[Path | None]:
    """A temporary folder for the windows' hidden states when they go to disk, else None.

    ``--activations-on-disk`` unset: on disk when a block's inputs plus outputs (and, with
    ``--reconstruct``, its targets and the dense stream) would take over a quarter of the free
    memory.  The folder sits beside the output (the user chose that disk)."""
    on_disk = config.activations_on_disk
    if on_disk is None:
        free = available_memory_bytes()
        copies = 2 + config.reconstruct * (1 + config.reconstruct_split + (config.reconstruct_inputs == "dense"))
        needed = 0 if windows is None else (
            activation_bytes(windows, model.config.hidden_size, DTYPES[config.dtype]) * copies // 2)
        on_disk = free is not None and needed > free // 4
    if not on_disk or windows is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.activations-", dir=out.parent) as folder:
        yield Path(folder)


def run_prune(config: PruneConfig, progress: ProgressFn | None = None) -> PruneResult:
    """``losa prune``: load, prune, save atomically; never touches the input model (``config`` checked itself)."""
    out = check_output(config.out, config.force, inputs=(config.model,))
    started = time.perf_counter()
    device = resolve_device(config.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    low_memory = _low_memory(config)
    loaded = (load_model_skeleton if low_memory else load_model)(config.model, config.dtype, config.trust_remote_code)
    if config.pattern:
        check_nm_widths(loaded.model, config.pattern)
    warnings: list[str] = []
    calibration = (
        calibration_windows(loaded.model, loaded.tokenizer, config.calibration, warnings)
        if config.needs_calibration
        else None
    )
    windows = calibration.windows if calibration is not None else None
    # magnitude needs no activations, unless the pruned blocks are fitted to their dense outputs
    activations = None if config.method == Method.MAGNITUDE and not config.reconstruct else windows
    settings = Reconstruction.of(config)
    reconstructor = Reconstructor(settings, progress) if settings is not None else None
    nm = parse_nm(config.pattern) if config.pattern else None
    criterion = Criterion(config.method, nm, config.damp, config.blocksize)
    with atomic_folder(out) as staging, _activation_folder(config, loaded.model, windows, out) as activations_dir:
        streamed = _Streamed(loaded, staging, DTYPES[config.dtype]) if low_memory else None
        allocation = block_rates(
            loaded.model,
            RateRule.of(config),
            config.sparsity,
            windows,
            device,
            nm=nm,
            per_layer=config.per_layer,
            progress=progress,
            loader=streamed and streamed.reader(keep=False),
            activations_dir=activations_dir,
        )
        rates = allocation.rates
        warnings += prune_blocks(
            loaded.model,
            criterion,
            rates,
            activations,
            device,
            progress,
            loader=streamed and streamed.reader(keep=True),
            activations_dir=activations_dir,
            reconstructor=reconstructor,
        )
        head = (
            _prune_head(loaded.model, criterion, sum(rates) / len(rates), activations, device, warnings)
            if config.prune_lm_head
            else None
        )
        per_layer, per_block, global_sparsity, checksum = (
            streamed.tally.report() if streamed else sparsity_report(loaded.model)
        )
        peak = peak_memory_mib(device)
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
            low_memory=low_memory,
            activations_on_disk=activations_dir is not None,
            allocation={k: v for k, v in asdict(allocation).items() if k != "rates"},
            lm_head=head,
            reconstruction=reconstructor.summary() if reconstructor is not None else None,
            warnings=warnings,
        )
        if streamed:
            streamed.save()
        else:
            save_model(loaded, staging)
        result.wall_time_s = time.perf_counter() - started
        manifest = build_manifest(
            "prune",
            inputs={
                "model": loaded.source.describe(),
                "calibration": config.calibration.calib,
                "calibration_encoding": calibration.encoding if calibration is not None else None,
            },
            settings=to_dict(config),
            results={k: v for k, v in result.__dict__.items() if k != "out"},
            parent_folder=Path(loaded.source.location) if loaded.source.is_local else None,
        )
        write_manifest(staging, manifest)
    return result
