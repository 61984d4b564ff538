"""The ``losa`` command line: one thin function per command.

Each command parses its options into a config, calls one workflow, and renders the result:
a table on stdout (or JSON with ``--json``), progress bars on stderr (the libraries' own bars, logs and
warnings only with ``--verbose``: ``core/quiet.py``).  This is the one place
that maps exceptions to one-line messages and exit codes; ``--debug`` or ``LOSA_DEBUG=1``
shows the traceback instead.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..core.config import (DEFAULT_MODEL, BenchConfig, CalibrationConfig, EvalConfig, ExportConfig, GenerateConfig,
                           PruneConfig, RecoverConfig)
from ..core.errors import ConfigError, LosaError
from ..core.quiet import quiet_third_party
from ..run.recipe import RunConfig

if TYPE_CHECKING:
    from ..runtime.zeroshot import ZeroShotResult

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Make LLMs sparse and keep them accurate.")
stdout = Console()
stderr = Console(stderr=True)
_debug = {"on": os.environ.get("LOSA_DEBUG", "") not in ("", "0")}


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", envvar="LOSA_VERBOSE",
                                          help="Also show the libraries' own progress bars, log messages and warnings.")] = False,
) -> None:
    """losa: prune, recover, export, benchmark and evaluate sparse LLMs."""
    if debug:
        _debug["on"] = True
    # Spin-waiting OpenMP threads slow torch ~5x on a busy 2-core machine; must precede torch's import.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    quiet_third_party(verbose)  # before any library is imported: losa draws its own progress


def _fail(message: str, code: int) -> typer.Exit:
    stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def handled(command: Callable[..., None]) -> Callable[..., None]:
    """Turn known failures into a one-line message and a non-zero exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except LosaError as exc:
            if _debug["on"]:
                raise
            raise _fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            if _debug["on"]:
                raise
            raise _fail("interrupted; no half-written output was left (finished stages and checkpoints are kept)", 130) from None
        except MemoryError:
            if _debug["on"]:
                raise
            raise _fail("out of memory: lower --nsamples or --seqlen, or use --dtype bfloat16", 3) from None
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
            if _debug["on"] or "out of memory" not in str(exc).lower():
                raise
            raise _fail("out of memory on the device: lower --nsamples or --seqlen, or use --device cpu", 3) from None

    return wrapper


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Callable[..., None] | None]:
    """A progress callback: one rich bar per task description on a terminal, else plain lines on
    stderr (each task at most every ``PLAIN_PROGRESS_S`` seconds, and when it completes), so a log
    of a long run shows it is alive."""
    if not enabled:
        yield None
        return
    if not stderr.is_terminal and os.environ.get("LOSA_PROGRESS") != "1":
        yield _plain_progress()
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=stderr, transient=False) as bars:
        tasks: dict[str, int] = {}

        def update(description: str, done: int, total: int, info: str = "") -> None:
            if description not in tasks:
                tasks[description] = bars.add_task(description, total=total, info=info)
            bars.update(tasks[description], completed=done, total=total, info=info)

        yield update


PLAIN_PROGRESS_S = 20.0


def _plain_progress() -> Callable[..., None]:
    last: dict[str, float] = {}

    def update(description: str, done: int, total: int, info: str = "") -> None:
        now = time.monotonic()
        if done >= total or now - last.get(description, -PLAIN_PROGRESS_S) >= PLAIN_PROGRESS_S:
            last[description] = now
            print(f"{description} {done}/{total} {info}".rstrip(), file=sys.stderr, flush=True)

    return update


def _is_main_process() -> bool:
    """Under ``accelerate launch`` / torchrun only rank 0 reports."""
    return os.environ.get("RANK", "0") == "0"


def _emit_json(payload: dict) -> None:
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")


def _execute(workflow: Callable[..., Any], config: Any, as_json: bool) -> Any | None:
    """Run a workflow with progress bars; print warnings, and the JSON when asked.

    Returns the result for the command to render as a table, or None when there is nothing more
    to show (JSON printed, or a non-zero rank under ``accelerate launch``)."""
    with progress_bars(not as_json and _is_main_process()) as progress:
        result = workflow(config, progress)
    if not _is_main_process():
        return None
    _warn(result.warnings)
    if as_json:
        _emit_json(result.to_dict() if hasattr(result, "to_dict") else asdict(result))
        return None
    return result


def _warn(warnings: list[str]) -> None:
    for line in warnings:
        stderr.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model folder, .gguf file, Hub id, or smollm2-135m.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
ENCODING_HELP = ("Text encoding of the data files: auto | utf-8 | latin-1 | cp1252 | ... any Python codec "
                 "(auto: UTF-8, else detected and named in a warning).")
SAMPLING_HELP = ("Calibration windows: stream (from the documents joined by blank lines) | document "
                 "(one random window of a random document longer than --seqlen, as the Wanda/SparseGPT loaders).")


@app.command()
@handled
def prune(
    out: Annotated[str, typer.Option("--out", "-o", help="Folder to write the pruned model to.")],
    model: ModelOpt = DEFAULT_MODEL,
    method: Annotated[str, typer.Option(help="wanda | sparsegpt | magnitude")] = PruneConfig.method,
    sparsity: Annotated[float, typer.Option(help="Unstructured sparsity in [0, 1).")] = PruneConfig.sparsity,
    pattern: Annotated[Optional[str], typer.Option(help="N:M pattern (zero N of every M inputs), e.g. 2:4.")] = None,
    prune_lm_head: Annotated[bool, typer.Option("--prune-lm-head", help="Also prune the output head at the blocks' mean rate (untied from a tied embedding).")] = False,
    per_layer: Annotated[Optional[str], typer.Option("--per-layer", help="JSON list of per-block rates, or a losa manifest (or its folder) to replay.")] = None,
    allocation: Annotated[str, typer.Option(help="Per-block rates: uniform | rmi | owl.")] = PruneConfig.allocation,
    delta: Annotated[Optional[float], typer.Option(help="RMI: max deviation from --sparsity (default by band).")] = None,
    beta: Annotated[Optional[float], typer.Option(help="RMI: importance temperature (default 1 Wanda, 100 SparseGPT).")] = None,
    rmi_samples: Annotated[int, typer.Option("--rmi-samples", help="RMI: calibration windows used for similarity.")] = PruneConfig.rmi_samples,
    owl_lambda: Annotated[float, typer.Option("--owl-lambda", help="OWL: rates span 2 x lambda around --sparsity.")] = PruneConfig.owl_lambda,
    owl_m: Annotated[float, typer.Option("--owl-m", help="OWL: outlier threshold, multiple of the mean score.")] = PruneConfig.owl_m,
    calib: Annotated[str, typer.Option(help="Calibration text: .txt, .jsonl or saved dataset folder (c4/wikitext2: from the Hub).")] = CalibrationConfig.calib,
    nsamples: Annotated[int, typer.Option(help="Calibration windows.")] = CalibrationConfig.nsamples,
    seqlen: Annotated[int, typer.Option(help="Tokens per window (clipped to the model's context).")] = CalibrationConfig.seqlen,
    seed: Annotated[int, typer.Option(help="Seed for sampling the windows.")] = CalibrationConfig.seed,
    sampling: Annotated[str, typer.Option(help=SAMPLING_HELP)] = CalibrationConfig.sampling,
    encoding: Annotated[str, typer.Option(help=ENCODING_HELP)] = CalibrationConfig.encoding,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = PruneConfig.device,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16 (statistics are fp32 always).")] = PruneConfig.dtype,
    damp: Annotated[float, typer.Option(help="SparseGPT damping, fraction of mean(diag H).")] = PruneConfig.damp,
    blocksize: Annotated[int, typer.Option(help="SparseGPT column block size.")] = PruneConfig.blocksize,
    low_memory: Annotated[Optional[bool], typer.Option("--low-memory/--in-memory", help="Read one block at a time from the memory-mapped safetensors and write the output block by block (default: when the model would take over half the free memory).")] = None,
    activations_on_disk: Annotated[Optional[bool], typer.Option("--activations-on-disk/--activations-in-memory", help="Keep the calibration windows' hidden states in files beside --out (default: when they would take over a quarter of the free memory).")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run the model repo's own code.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Prune a model's linear layers block by block (Wanda, SparseGPT or magnitude)."""
    from ..prune.workflow import run_prune

    config = PruneConfig(
        model=model, out=out, method=method, sparsity=sparsity, pattern=pattern, prune_lm_head=prune_lm_head, per_layer=per_layer,
        allocation=allocation, delta=delta, beta=beta, rmi_samples=rmi_samples, owl_lambda=owl_lambda, owl_m=owl_m,
        calibration=CalibrationConfig(calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, sampling=sampling,
                                      encoding=encoding),
        device=device, dtype=dtype, damp=damp, blocksize=blocksize, low_memory=low_memory,
        activations_on_disk=activations_on_disk, force=force,
        trust_remote_code=trust_remote_code,
    )
    result = _execute(run_prune, config, as_json)
    if result is None:
        return
    setting = result.pattern or f"{result.target_sparsity:.0%} {result.allocation.get('kind', '')}"
    table = Table(title=f"losa prune: {result.method} {setting} -> {result.out}")
    table.add_column("block", justify="right")
    table.add_column("target", justify="right")
    table.add_column("zeros", justify="right")
    for index, (rate, actual) in enumerate(zip(result.per_block_rates, result.per_block_sparsity)):
        table.add_row(str(index), f"{rate:.4f}", f"{actual:.4f}")
    table.add_row("all", f"{result.target_sparsity:.4f}", f"{result.global_sparsity:.4f}", style="bold")
    if result.lm_head is not None:
        table.add_row("lm_head", f"{result.lm_head['rate']:.4f}", f"{result.lm_head['sparsity']:.4f}")
    stdout.print(table)
    if result.lm_head and result.lm_head["untied_from_embedding"]:
        stdout.print("lm_head was tied to the embedding: it is now a pruned copy, saved beside the intact embedding",
                     highlight=False)
    stdout.print(
        f"calibration {result.nsamples} x {result.seqlen} tokens on {result.device}; "
        f"{result.wall_time_s:.1f} s, peak memory {result.peak_memory_mib:.0f} MiB"
        f"{' (one block at a time)' if result.low_memory else ''}; mask sha256 {result.mask_checksum[:16]}",
        highlight=False,
    )


@app.command("eval")
@handled
def eval_(
    model: ModelOpt = DEFAULT_MODEL,
    data: Annotated[Optional[str], typer.Option(help="Evaluation text (.txt/.jsonl/saved dataset, or wikitext2).")] = None,
    encoding: Annotated[str, typer.Option(help=ENCODING_HELP)] = EvalConfig.encoding,
    seqlen: Annotated[int, typer.Option(help="Tokens per window (clipped to the model's context).")] = EvalConfig.seqlen,
    max_windows: Annotated[Optional[int], typer.Option("--max-windows", help="Use at most this many windows.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows (or --tasks choices) per forward pass.")] = EvalConfig.batch_size,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16")] = EvalConfig.dtype,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = EvalConfig.device,
    sparsity: Annotated[bool, typer.Option("--sparsity", help="Report per-layer and global zero fractions.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run the model repo's own code.")] = False,
    tokenizer: Annotated[Optional[str], typer.Option(help="ONNX --model only: tokenizer folder, when none is beside the graphs.")] = None,
    tasks: Annotated[Optional[str], typer.Option(help="Multiple-choice accuracy through lm-eval: comma-separated task names (hellaswag, arc_easy: from the Hub) or local .jsonl files.")] = None,
    num_fewshot: Annotated[int, typer.Option("--num-fewshot", help="--tasks: solved examples before each question.")] = EvalConfig.num_fewshot,
    limit: Annotated[Optional[int], typer.Option(help="--tasks: score only the first N questions of each task.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Perplexity over non-overlapping windows, multiple-choice accuracy (lm-eval), and/or the zero fractions of any model.

    --model may also be an ONNX export (folder or .onnx file): its prefill graph then runs on
    ONNX Runtime, so an int8 export is measured on the same windows as the PyTorch model.
    """
    from ..runtime.evaluate import run_eval

    task_list = None if tasks is None else [name.strip() for name in tasks.split(",")]
    config = EvalConfig(model=model, data=data, seqlen=seqlen, max_windows=max_windows, dtype=dtype, device=device,
                        batch_size=batch_size, sparsity=sparsity, trust_remote_code=trust_remote_code, tokenizer=tokenizer,
                        tasks=task_list, num_fewshot=num_fewshot, limit=limit, encoding=encoding)
    result = _execute(run_eval, config, as_json)
    if result is None:
        return
    if result.sparsity is not None:
        table = Table(title=f"zero fractions of {result.model}")
        table.add_column("layer")
        table.add_column("zeros", justify="right")
        for name, fraction in result.sparsity.per_layer_sparsity.items():
            table.add_row(name, f"{fraction:.4f}")
        table.add_row("all pruned linear layers", f"{result.sparsity.global_sparsity:.4f}", style="bold")
        stdout.print(table)
    if result.perplexity is not None:
        p = result.perplexity
        stdout.print(
            f"perplexity {p.perplexity:.4f} on {p.data}: {p.windows} windows x {p.seqlen} tokens "
            f"({p.predicted_tokens} predicted), BOS per window: {'yes' if p.bos_per_window else 'no'}, "
            f"{p.dtype} on {p.device}, {p.wall_time_s:.1f} s",
            highlight=False,
        )
    if result.zeroshot is not None:
        _print_accuracy(result.zeroshot)


def _print_accuracy(zeroshot: ZeroShotResult) -> None:
    """One row per task: what was run (version, shots, questions) and the two accuracies with their stderr."""
    def with_stderr(value: float | None, stderr: float | None) -> str:
        if value is None:
            return "-"
        return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")

    table = Table(title=f"multiple-choice accuracy (lm-eval {zeroshot.lm_eval_version})")
    for name, justify in (("task", "left"), ("version", "right"), ("shots", "right"), ("n", "right"), ("acc", "right"),
                          ("acc_norm", "right")):
        table.add_column(name, justify=justify)
    for task in zeroshot.tasks:
        table.add_row(task.task, task.version, str(task.num_fewshot), str(task.samples), with_stderr(task.acc, task.acc_stderr),
                      with_stderr(task.acc_norm, task.acc_norm_stderr))
    stdout.print(table)
    stdout.print(f"{zeroshot.dtype} on {zeroshot.device}, batch size {zeroshot.batch_size}, {zeroshot.wall_time_s:.1f} s",
                 highlight=False)


@app.command()
@handled
def generate(
    prompt: Annotated[str, typer.Option(help="The text to continue.")],
    model: ModelOpt = DEFAULT_MODEL,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate.")] = GenerateConfig.max_new_tokens,
    sample: Annotated[bool, typer.Option("--sample", help="Sample (with --temperature, --top-p, --seed) instead of greedy.")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = GenerateConfig.temperature,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling: keep the smallest token set of this probability.")] = GenerateConfig.top_p,
    seed: Annotated[int, typer.Option(help="Seed for sampling.")] = GenerateConfig.seed,
    kernel: Annotated[str, typer.Option(help="Block linears on losa's sparse kernel: fp32 | bf16 | int8 values + bitmask, or off (dense PyTorch).")] = GenerateConfig.kernel,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: torch's).")] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run the model repo's own code.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Continue a prompt (greedy or sampled, KV cache), the pruned layers on losa's sparse kernel."""
    from ..runtime.generate import run_generate

    config = GenerateConfig(model=model, prompt=prompt, max_new_tokens=max_new_tokens, sample=sample, temperature=temperature,
                            top_p=top_p, seed=seed, kernel=kernel, threads=threads, trust_remote_code=trust_remote_code)
    result = _execute(run_generate, config, as_json)
    if result is None:
        return
    stdout.print(result.text, highlight=False, markup=False)
    where = f"{result.sparse_layers} layers on the {result.kernel} sparse kernel ({result.kernel_path})" \
        if result.kernel_path else "dense PyTorch"
    stderr.print(f"{result.new_tokens} tokens after a {result.prompt_tokens}-token prompt, {result.ms_per_token:.1f} ms per token "
                 f"({result.tokens_per_s:.1f} tokens/s), {where}, {result.threads} thread(s)", highlight=False)


@app.command()
@handled
def inspect(
    model: Annotated[str, typer.Argument(help="Model folder (pruned or not), .gguf file, or smollm2-135m.")],
    plot: Annotated[Optional[str], typer.Option(help="Write a PNG: per-block bars and the RMI heatmap.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing --plot file.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run the model repo's own code.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Per-block sparsity (and rates, ranks, similarity, lineage from the manifest) of any model."""
    from ..run.inspection import run_inspect

    result = run_inspect(model, plot, force, trust_remote_code)
    if as_json:
        _emit_json(result.to_dict())
        return
    table = Table(title=f"{model}: {result.global_sparsity:.2%} of the block linear weights are zero")
    table.add_column("block", justify="right")
    table.add_column("zeros", justify="right")
    if result.per_block_rates is not None:
        table.add_column(f"target ({result.allocation or 'given'})", justify="right")
    if result.ranks is not None:
        table.add_column("rank", justify="right")
    for index, zeros in enumerate(result.per_block_sparsity):
        row = [str(index), f"{zeros:.4f}"]
        if result.per_block_rates is not None:
            row.append(f"{result.per_block_rates[index]:.4f}")
        if result.ranks is not None:
            row.append(str(result.ranks[index]))
        table.add_row(*row)
    stdout.print(table)
    for depth, step in enumerate(result.lineage):
        stdout.print(f"{'  ' * depth}<- {step['command']} ({step['created']}): {' '.join(step['argv'] or [])}", highlight=False)
    if result.plot:
        stdout.print(f"plot written to {result.plot}", highlight=False)


def _numbers(text: Optional[str], kind: type, option: str) -> list | None:
    if text is None:
        return None
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise _fail(f"{option} {text!r}: give comma-separated numbers, e.g. 125,125,125,125,750", 2) from None


@app.command()
@handled
def recover(
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for the recovered sparse model (adapters merged).")],
    data: Annotated[str, typer.Option(help="Fine-tuning text: instruction .jsonl (Alpaca fields) or .txt/.jsonl text.")],
    model: ModelOpt = DEFAULT_MODEL,
    sparsity: Annotated[Optional[float], typer.Option(help="Target sparsity reached at the last stage (default 0.7; N/M with --pattern).")] = None,
    method: Annotated[str, typer.Option(help="wanda | sparsegpt (pruning at every stage).")] = RecoverConfig.method,
    pattern: Annotated[Optional[str], typer.Option(help="N:M, ramped over the stages (2:4: 1:4 then 2:4); ends exactly N:M.")] = None,
    damp: Annotated[float, typer.Option(help="SparseGPT damping, fraction of mean(diag H).")] = RecoverConfig.damp,
    blocksize: Annotated[int, typer.Option(help="SparseGPT column block size.")] = RecoverConfig.blocksize,
    loss: Annotated[str, typer.Option(help="ce | kd | kd+ce | squarehead (kd and feature loss); kd* distil the dense input model.")] = RecoverConfig.loss,
    kd_temperature: Annotated[float, typer.Option("--kd-temperature", help="Distillation temperature.")] = RecoverConfig.kd_temperature,
    allocation: Annotated[str, typer.Option(help="Per-block rates each stage: rmi | owl | uniform.")] = RecoverConfig.allocation,
    stages: Annotated[int, typer.Option(help="Number of prune+fine-tune stages (1 = one-shot + masked LoRA).")] = RecoverConfig.stages,
    total_steps: Annotated[int, typer.Option("--total-steps", help="Optimizer steps over all stages.")] = RecoverConfig.total_steps,
    final_share: Annotated[float, typer.Option("--final-share", help="Share of the steps for the last stage.")] = RecoverConfig.final_share,
    steps_per_stage: Annotated[Optional[str], typer.Option("--steps-per-stage", help="Explicit steps, e.g. 125,125,125,125,750.")] = None,
    mean_ranks: Annotated[Optional[str], typer.Option("--mean-ranks", help="Mean LoRA rank per stage (default 6..10).")] = None,
    rank_allocation: Annotated[str, typer.Option("--rank-allocation", help="error (LoSA) | uniform.")] = RecoverConfig.rank_allocation,
    rank_min: Annotated[int, typer.Option("--rank-min")] = RecoverConfig.rank_min,
    rank_max: Annotated[int, typer.Option("--rank-max", help="Width of the LoRA factors.")] = RecoverConfig.rank_max,
    alpha: Annotated[float, typer.Option(help="LoRA scale numerator: s = alpha / rank-max.")] = RecoverConfig.alpha,
    dropout: Annotated[float, typer.Option(help="LoRA dropout (0 lets the fused form use one matmul).")] = RecoverConfig.dropout,
    fused: Annotated[bool, typer.Option("--fused/--plain", help="Fused masked-LoRA kernel or the plain two-matmul form.")] = True,
    adapter: Annotated[str, typer.Option(help="masked-lora (LoSA) | losia (train a gradient-localised core sub-matrix of each weight).")] = RecoverConfig.adapter,
    losia_ratio: Annotated[float, typer.Option("--losia-ratio", help="losia: share of rows and of columns in each layer's core sub-matrix.")] = RecoverConfig.losia_ratio,
    losia_period: Annotated[int, typer.Option("--losia-period", help="losia: steps between relocalisations (and at every stage start).")] = RecoverConfig.losia_period,
    calib: Annotated[str, typer.Option(help="Calibration text for pruning: .txt, .jsonl or saved dataset folder (c4/wikitext2: from the Hub).")] = CalibrationConfig.calib,
    nsamples: Annotated[int, typer.Option(help="Calibration windows.")] = CalibrationConfig.nsamples,
    seqlen: Annotated[int, typer.Option(help="Calibration window length.")] = CalibrationConfig.seqlen,
    sampling: Annotated[str, typer.Option(help=SAMPLING_HELP)] = CalibrationConfig.sampling,
    encoding: Annotated[str, typer.Option(help=f"{ENCODING_HELP} For --data and --calib.")] = CalibrationConfig.encoding,
    error_samples: Annotated[int, typer.Option("--error-samples", help="Windows for reconstruction error.")] = RecoverConfig.error_samples,
    rmi_samples: Annotated[int, typer.Option("--rmi-samples")] = RecoverConfig.rmi_samples,
    max_length: Annotated[int, typer.Option("--max-length", help="Fine-tuning sequence length.")] = RecoverConfig.max_length,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per process per micro-step.")] = RecoverConfig.batch_size,
    grad_accum: Annotated[int, typer.Option("--grad-accum")] = RecoverConfig.grad_accum,
    lr: Annotated[float, typer.Option()] = RecoverConfig.lr,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = RecoverConfig.weight_decay,
    grad_clip: Annotated[float, typer.Option("--grad-clip")] = RecoverConfig.grad_clip,
    warmup: Annotated[float, typer.Option(help="Warm-up share of each stage.")] = RecoverConfig.warmup,
    response_only: Annotated[bool, typer.Option("--response-only/--full-loss", help="Loss on responses only.")] = True,
    reset_optimizer: Annotated[bool, typer.Option("--reset-optimizer/--carry-optimizer", help="Restart AdamW each stage.")] = True,
    seed: Annotated[int, typer.Option()] = CalibrationConfig.seed,
    dtype: Annotated[str, typer.Option(help="Base weights: float32 | bfloat16 | float16.")] = RecoverConfig.dtype,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda (accelerate picks the GPU of each process).")] = RecoverConfig.device,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every")] = RecoverConfig.checkpoint_every,
    resume: Annotated[bool, typer.Option(help="Continue from OUT.checkpoint.")] = False,
    force: Annotated[bool, typer.Option(help="Replace --out and discard an old checkpoint.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code")] = False,
    as_json: JsonOpt = False,
) -> None:
    """LoSA: prune in stages and fine-tune masked LoRA that keeps every zero; merge at the end."""
    from ..recover.workflow import run_recover

    config = RecoverConfig(
        model=model, out=out, data=data, sparsity=sparsity, method=method, pattern=pattern, damp=damp, blocksize=blocksize,
        loss=loss, kd_temperature=kd_temperature,
        allocation=allocation,
        rmi_samples=rmi_samples, stages=stages, total_steps=total_steps, final_share=final_share,
        steps_per_stage=_numbers(steps_per_stage, int, "--steps-per-stage"),
        mean_ranks=_numbers(mean_ranks, float, "--mean-ranks"), rank_allocation=rank_allocation, rank_min=rank_min,
        rank_max=rank_max, alpha=alpha, dropout=dropout, fused=fused, adapter=adapter, losia_ratio=losia_ratio,
        losia_period=losia_period, error_samples=error_samples,
        calibration=CalibrationConfig(calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, sampling=sampling,
                                      encoding=encoding),
        max_length=max_length,
        batch_size=batch_size, grad_accum=grad_accum, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip, warmup=warmup,
        response_only=response_only, reset_optimizer=reset_optimizer, dtype=dtype, device=device,
        checkpoint_every=checkpoint_every, resume=resume, force=force, trust_remote_code=trust_remote_code,
    )
    result = _execute(run_recover, config, as_json)
    if result is None:
        return
    table = Table(title=f"losa recover -> {result.out}")
    for column in ("stage", "target", "zeros", "mean rank", "steps", "first loss", "last loss"):
        table.add_column(column, justify="right")
    for s in result.stages:
        first = f"{s.losses[0]:.3f}" if s.losses else "-"
        last = f"{s.losses[-1]:.3f}" if s.losses else "-"
        table.add_row(str(s.stage), f"{s.target_sparsity:.3f}", f"{s.sparsity:.4f}", f"{sum(s.ranks) / len(s.ranks):.2f}",
                      str(s.steps), first, last)
    stdout.print(table)
    stdout.print(f"global sparsity {result.global_sparsity:.4f} (every weight pruned in any stage verified zero after merge); "
                 f"{result.tokens_trained} training tokens on {result.processes} process(es); {result.wall_time_s:.0f} s; "
                 f"mask sha256 {result.mask_checksum[:16]}", highlight=False)


@app.command()
@handled
def export(
    model: Annotated[str, typer.Argument(help="Model folder to export (pruned or recovered).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Folder to write the model (and onnx/) to.")],
    onnx: Annotated[bool, typer.Option("--onnx", help="Also export ONNX prefill and KV-cache decode graphs, verified.")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="With --onnx: also int8-weight graphs in onnx-int8/ (ONNX Runtime form).")] = False,
    safetensors: Annotated[bool, typer.Option("--safetensors/--no-safetensors", help="Write the model's safetensors (--no-safetensors with --onnx: graphs, config and tokenizer only).")] = True,
    batch: Annotated[Optional[int], typer.Option(help="Fix the ONNX batch size (default: dynamic).")] = None,
    seqlen: Annotated[Optional[int], typer.Option(help="Fix the ONNX prompt length (default: dynamic).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset; DeepSparse 1.8 needs 17 or lower.")] = ExportConfig.opset,
    decode: Annotated[bool, typer.Option("--decode/--no-decode", help="Export the KV-cache decode graph.")] = ExportConfig.decode,
    tolerance: Annotated[float, typer.Option(help="Max |ONNX - PyTorch| logits, relative to max |logits|.")] = ExportConfig.tolerance,
    force: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run the model repo's own code.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Save safetensors and, with --onnx, export and verify ONNX graphs."""
    from ..export.workflow import run_export

    config = ExportConfig(model=model, out=out, onnx=onnx, int8=int8, safetensors=safetensors, batch=batch, seqlen=seqlen, opset=opset,
                          decode=decode, tolerance=tolerance, force=force, trust_remote_code=trust_remote_code)
    result = _execute(run_export, config, as_json)
    if result is None:
        return
    stdout.print(f"wrote {result.out}: {result.global_sparsity:.2%} of the block linear weights are zero "
                 f"(mask sha256 {result.mask_checksum[:16]}); {result.wall_time_s:.1f} s, "
                 f"peak memory {result.peak_memory_mib:.0f} MiB", highlight=False)
    if result.onnx is not None:
        graphs, check = result.onnx["graphs"], result.onnx["verification"]
        table = Table(title=f"ONNX opset {graphs['opset']} in {result.out}/{result.onnx['folder']}")
        table.add_column("check")
        table.add_column("result", justify="right")
        table.add_row("graphs", ", ".join(filter(None, (graphs["prefill"], graphs["decode"]))))
        table.add_row("max |logits diff| prefill", f"{check['prefill_max_abs_diff']:.3g}")
        if check["decode_max_abs_diff"] is not None:
            table.add_row("max |logits diff| decode", f"{check['decode_max_abs_diff']:.3g}")
        if check["greedy_match"] is not None:
            table.add_row("greedy tokens match", "yes" if check["greedy_match"] else "NO")
        table.add_row("weights with identical zeros", f"{check['weights_checked'] - len(check['zero_mismatches'])}/{check['weights_checked']}")
        table.add_row("external data (> 2 GB)", "yes" if graphs["external_data"] else "no")
        if result.onnx_int8 is not None:
            versus = result.onnx_int8["comparison"]
            table.add_row("int8: max |logits diff| vs fp32 graph", f"{versus['prefill_max_abs_diff']:.3g} "
                          f"(max |logits| {versus['logits_max_abs']:.3g})")
            table.add_row("int8: top-1 agreement (prefill)", f"{versus['top1_agreement']:.1%}")
            if "greedy_agreement" in versus:
                table.add_row("int8: greedy tokens equal", f"{versus['greedy_agreement']:.1%}")
            table.add_row("int8: every pruned weight still zero", "yes")
        stdout.print(table)


@app.command()
@handled
def bench(
    model: Annotated[str, typer.Argument(help="Model folder, losa export folder, or prefill .onnx file.")],
    cpu: Annotated[bool, typer.Option("--cpu", help="Benchmark on the CPU (the only target so far).")] = True,
    dense_baseline: Annotated[Optional[str], typer.Option("--dense-baseline", help="Dense model to compare with (default: densified copy).")] = None,
    engines: Annotated[str, typer.Option(help="Comma-separated: onnxruntime,deepsparse,losa (losa: its own sparse kernel in PyTorch).")] = BenchConfig.engines,
    batch: Annotated[int, typer.Option(help="Sequences per run.")] = BenchConfig.batch,
    seqlen: Annotated[int, typer.Option(help="Prompt tokens (prefill) and past length (decode).")] = BenchConfig.seqlen,
    decode_tokens: Annotated[int, typer.Option("--decode-tokens", help="Decode steps per iteration (0: prefill only).")] = BenchConfig.decode_tokens,
    threads: Annotated[Optional[int], typer.Option(help="Engine threads (default: cores - 1).")] = None,
    warmup: Annotated[int, typer.Option(help="Untimed runs before timing.")] = BenchConfig.warmup,
    iterations: Annotated[int, typer.Option(help="Timed runs.")] = BenchConfig.iterations,
    report: Annotated[Optional[str], typer.Option(help="Write a PNG bar chart of the latencies.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing --report file.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run the model repo's own code.")] = False,
    precisions: Annotated[str, typer.Option(help="Comma-separated weight precisions: fp32,bf16,int8 (int8 quantized for the run; bf16: losa engine only).")] = BenchConfig.precisions,
    compile_models: Annotated[bool, typer.Option("--compile", help="losa engine: run its models under torch.compile (about a minute per timing to compile).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Latency and throughput of a sparse model vs its dense counterpart on CPU engines.

    Decode rows (batch 1) also show the bandwidth ceiling: the bytes a step must read in the
    format the engine uses, over this machine's measured read bandwidth, and the share reached.
    """
    from ..runtime.bench import run_bench

    if not cpu:
        raise ConfigError("only CPU benchmarking exists: drop --no-cpu")
    config = BenchConfig(model=model, dense_baseline=dense_baseline, engines=engines, batch=batch, seqlen=seqlen,
                         decode_tokens=decode_tokens, threads=threads, warmup=warmup, iterations=iterations, report=report,
                         force=force, trust_remote_code=trust_remote_code, precisions=precisions, compile=compile_models)
    result = _execute(run_bench, config, as_json)
    if result is None:
        return
    settings = result.settings
    table = Table(title=f"losa bench: {result.model} ({result.sparse['matmul_zero_fraction']:.1%} zeros) vs "
                        f"{result.dense['source']} ({result.dense['matmul_zero_fraction']:.1%}); batch {settings['batch']}, "
                        f"{settings['seqlen']} tokens, {settings['threads']} thread(s)")
    names = ("engine", "model", "precision", "phase")
    for column in (*names, "median ms", "p90 ms", "tokens/s", "vs ORT dense fp32", "ceiling ms", "share"):
        table.add_column(column, justify="left" if column in names else "right")
    for run in result.runs:
        t, ceiling, speedup = run["timing"], run.get("ceiling"), run.get("speedup_vs_onnxruntime_dense_fp32")
        if t is None:
            table.add_row(*(run[n] for n in names), "failed", "", run["error"] or "")
            continue
        table.add_row(*(run[n] for n in names), f"{t['median_ms']:.2f}", f"{t['p90_ms']:.2f}", f"{t['tokens_per_s']:.1f}",
                      f"{speedup:.2f}x" if speedup else "", f"{ceiling['ceiling_ms']:.2f} ({ceiling['format']})" if ceiling else "",
                      f"{ceiling['share']:.0%}" if ceiling else "")
    stdout.print(table)
    if "read_bandwidth_gb_s" in result.machine:
        stdout.print(f"ceiling: bytes read per decode token / measured read bandwidth {result.machine['read_bandwidth_gb_s']:.1f} GB/s "
                     f"({settings['threads']} thread(s)); share = ceiling / median", highlight=False)
    for row in result.speedups:
        stdout.print(f"{row['phase']}: {row['sparse']} is {row['speedup']:.2f}x the speed of {row['dense']}", highlight=False)
    for note in result.notes:
        stdout.print(f"note: {note}", highlight=False)
    load = f"{result.load_average_before[0]:.2f} -> {result.load_average_after[0]:.2f}" if result.load_average_before else "n/a"
    stdout.print(f"{result.machine['cpu']} ({', '.join(result.machine['isa_flags'])}); load average {load}", highlight=False)
    if result.report:
        stdout.print(f"report written to {result.report}", highlight=False)


@app.command("run")
@handled
def run_command(
    args: Annotated[Optional[list[str]], typer.Argument(
        metavar="[CONFIG.yaml] [SECTION.KEY=VALUE]...",
        help="A recipe (see examples/; none: the default recipe), then overrides such as recover.total_steps=40 or prune=null.")] = None,
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for the stages, report.md and PNGs.")] = RunConfig.out,
    restart: Annotated[bool, typer.Option("--restart", help="Redo every stage, even those already finished.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """prune -> recover -> export -> bench (+ eval) from one recipe; finished stages are skipped on re-runs."""
    from ..run.pipeline import run_pipeline

    files = [a for a in args or [] if "=" not in a]
    if len(files) > 1:
        raise ConfigError(f"give one recipe file, got {', '.join(files)} (overrides are section.key=value)")
    config = RunConfig(recipe=files[0] if files else None, overrides=[a for a in args or [] if "=" in a], out=out,
                       restart=restart)
    result = _execute(run_pipeline, config, as_json)
    if result is None:
        return
    table = Table(title=f"losa run -> {result.out}")
    for column in ("stage", "this run", "time", "folder"):
        table.add_column(column, justify="right" if column == "time" else "left")
    for stage in result.stages:
        table.add_row(stage.name, stage.status, f"{stage.wall_time_s:.1f} s", stage.folder)
    stdout.print(table)
    if result.perplexity_before is not None and result.perplexity_after is not None:
        stdout.print(f"perplexity {result.perplexity_before:.4f} (input) -> {result.perplexity_after:.4f} (final)", highlight=False)
    if result.global_sparsity is not None:
        stdout.print(f"final model {result.final_model}: {result.global_sparsity:.2%} of the block linear weights are zero",
                     highlight=False)
    for row in result.speedups:
        stdout.print(f"{row['phase']}: {row['sparse']} is {row['speedup']:.2f}x the speed of {row['dense']}", highlight=False)
    stdout.print(f"report written to {result.report}; lineage: losa inspect {result.final_model}", highlight=False)


def run() -> None:
    """Console-script entry point."""
    app()
