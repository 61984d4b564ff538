"""How each command's result reads on a terminal: rich tables and plain lines on stdout."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from .application import line, stderr, stdout


def _table(title: str, columns: list[str], left: tuple[str, ...] = ()) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in left else "right")
    return table


def prune(result: Any) -> None:
    setting = result.pattern or f"{result.target_sparsity:.0%} {result.allocation.get('kind', '')}"
    table = _table(f"losa prune: {result.method} {setting} -> {result.out}", ["block", "target", "zeros"])
    for index, (rate, actual) in enumerate(zip(result.per_block_rates, result.per_block_sparsity)):
        table.add_row(str(index), f"{rate:.4f}", f"{actual:.4f}")
    table.add_row("all", f"{result.target_sparsity:.4f}", f"{result.global_sparsity:.4f}", style="bold")
    if result.lm_head is not None:
        table.add_row("lm_head", f"{result.lm_head['rate']:.4f}", f"{result.lm_head['sparsity']:.4f}")
    stdout.print(table)
    if result.lm_head and result.lm_head["untied_from_embedding"]:
        line("lm_head was tied to the embedding: it is now a pruned copy, saved beside the intact embedding")
    line(f"calibration {result.nsamples} x {result.seqlen} tokens on {result.device}; "
         f"{result.wall_time_s:.1f} s, peak memory {result.peak_memory_mib:.0f} MiB"
         f"{' (one block at a time)' if result.low_memory else ''}; mask sha256 {result.mask_checksum[:16]}")
    if result.reconstruction:
        done = result.reconstruction
        first = sum(f["first_loss"] for f in done["blocks"]) / len(done["blocks"])
        last = sum(f["last_loss"] for f in done["blocks"]) / len(done["blocks"])
        line(f"reconstruction ({done['params']}, {done['inputs']} inputs, {done['steps']} steps per block): "
             f"block MSE first -> last step, mean over blocks {first:.4g} -> {last:.4g}; {done['wall_time_s']:.1f} s")


def recover(result: Any) -> None:
    table = _table(f"losa recover -> {result.out}",
                   ["stage", "target", "zeros", "mean rank", "steps", "first loss", "last loss"])
    for s in result.stages:
        first = f"{s.losses[0]:.3f}" if s.losses else "-"
        last = f"{s.losses[-1]:.3f}" if s.losses else "-"
        table.add_row(
            str(s.stage),
            f"{s.target_sparsity:.3f}",
            f"{s.sparsity:.4f}",
            f"{sum(s.ranks) / len(s.ranks):.2f}",
            str(s.steps),
            first,
            last,
        )
    stdout.print(table)
    for s in result.stages:  # a loss of exactly 0 from the first steps on: no gradient, nothing learnt
        if s.losses and all(loss == 0 for loss in s.losses[:5]):
            stderr.print(f"[yellow]warning:[/] stage {s.stage}: the loss was exactly 0 from its first steps, so "
                         "nothing was learnt; check --loss, kd_temperature and the data's labels", highlight=False,
                         soft_wrap=True)
    line(
        f"global sparsity {result.global_sparsity:.4f} (every weight pruned in any stage verified zero after merge); "
        f"{result.tokens_trained} training tokens on {result.processes} process(es)"
        f"{' (FSDP: sharded)' if getattr(result, 'fsdp', False) else ''}; {result.wall_time_s:.0f} s; "
        f"mask sha256 {result.mask_checksum[:16]}"
    )


def export(result: Any) -> None:
    line(
        f"wrote {result.out}: {result.global_sparsity:.2%} of the block linear weights are zero "
        f"(mask sha256 {result.mask_checksum[:16]}); {result.wall_time_s:.1f} s, "
        f"peak memory {result.peak_memory_mib:.0f} MiB"
    )
    if result.onnx is None:
        return
    graphs, check = result.onnx["graphs"], result.onnx["verification"]
    table = _table(
        f"ONNX opset {graphs['opset']} in {result.out}/{result.onnx['folder']}", ["check", "result"], left=("check",)
    )
    table.add_row("graphs", ", ".join(filter(None, (graphs["prefill"], graphs["decode"]))))
    table.add_row("max |logits diff| prefill", f"{check['prefill_max_abs_diff']:.3g}")
    if check["decode_max_abs_diff"] is not None:
        table.add_row("max |logits diff| decode", f"{check['decode_max_abs_diff']:.3g}")
    if check["greedy_match"] is not None:
        table.add_row("greedy tokens match", "yes" if check["greedy_match"] else "NO")
    table.add_row(
        "weights with identical zeros",
        f"{check['weights_checked'] - len(check['zero_mismatches'])}/{check['weights_checked']}",
    )
    table.add_row("external data (> 2 GB)", "yes" if graphs["external_data"] else "no")
    if result.onnx_int8 is not None:
        versus = result.onnx_int8["comparison"]
        table.add_row(
            "int8: max |logits diff| vs fp32 graph",
            f"{versus['prefill_max_abs_diff']:.3g} (max |logits| {versus['logits_max_abs']:.3g})",
        )
        table.add_row("int8: top-1 agreement (prefill)", f"{versus['top1_agreement']:.1%}")
        if "greedy_agreement" in versus:
            table.add_row("int8: greedy tokens equal", f"{versus['greedy_agreement']:.1%}")
        table.add_row("int8: every pruned weight still zero", "yes")
    stdout.print(table)


def bench(result: Any) -> None:
    settings = result.settings
    names = ["engine", "model", "precision", "phase"]
    scored = any(run.get("accuracy") for run in result.runs)
    table = _table(
        f"losa bench: {result.model} ({_zeros(result.sparse)}) vs {result.dense['source']} "
        f"({_zeros(result.dense)}); batch {settings['batch']}, "
        f"{settings['seqlen']} tokens, {settings['threads']} thread(s)",
        [*names, "median ms", "p90 ms", "tokens/s", "vs ORT dense fp32", "ceiling ms", "share",
         *(("perplexity", "top-1 = fp32") if scored else ())],
        left=tuple(names),
    )
    for run in result.runs:
        t, ceiling, speedup = run["timing"], run.get("ceiling"), run.get("speedup_vs_onnxruntime_dense_fp32")
        if t is None:
            table.add_row(*(run[n] for n in names), "failed", "", "(see its warning)")  # the error is long
            continue
        table.add_row(
            *(run[n] for n in names),
            f"{t['median_ms']:.2f}",
            f"{t['p90_ms']:.2f}",
            f"{t['tokens_per_s']:.1f}",
            f"{speedup:.2f}x" if speedup else "",
            f"{ceiling['ceiling_ms']:.2f} ({ceiling['format']})" if ceiling else "",
            f"{ceiling['share']:.0%}" if ceiling else "",
            *(_accuracy_cells(run.get("accuracy")) if scored else ()),
        )
    stdout.print(table)
    if scored:
        first = next(run["accuracy"] for run in result.runs if run.get("accuracy"))
        line(f"perplexity on {result.settings['data']}: {first['windows']} windows x {first['seqlen']} tokens; top-1 = "
             "fp32: share of positions whose next-token argmax equals the fp32 sparse model's (teacher-forced)")
    if "read_bandwidth_gb_s" in result.machine:
        line(
            f"ceiling: bytes read per decode token / measured read bandwidth "
            f"{result.machine['read_bandwidth_gb_s']:.1f} GB/s ({settings['threads']} thread(s)); "
            "share = ceiling / median"
        )
    speedups(result.speedups)
    for note in result.notes:
        line(f"note: {note}")
    load = (
        f"{result.load_average_before[0]:.2f} -> {result.load_average_after[0]:.2f}"
        if result.load_average_before
        else "n/a"
    )
    line(f"{result.machine['cpu']} ({', '.join(result.machine['isa_flags'])}); load average {load}")
    if result.report:
        line(f"report written to {result.report}")


def _accuracy_cells(accuracy: dict | None) -> tuple[str, str]:
    if not accuracy:
        return "", ""
    agreement = accuracy["top1_agreement"]
    return f"{accuracy['perplexity']:.2f}", "" if agreement is None else f"{agreement:.1%}"


def _zeros(model: dict) -> str:
    """A bench model's zero fraction; unknown when every timing of it failed (no compiler for the losa kernel)."""
    fraction = model.get("matmul_zero_fraction")
    return "zeros unknown" if fraction is None else f"{fraction:.1%} zeros"


def speedups(rows: list[dict]) -> None:
    for row in rows:
        line(f"{row['phase']}: {row['sparse']} is {row['speedup']:.2f}x the speed of {row['dense']}")


def evaluation(result: Any) -> None:
    if result.sparsity is not None:
        table = _table(f"zero fractions of {result.model}", ["layer", "zeros"], left=("layer",))
        for name, fraction in result.sparsity.per_layer_sparsity.items():
            table.add_row(name, f"{fraction:.4f}")
        table.add_row("all pruned linear layers", f"{result.sparsity.global_sparsity:.4f}", style="bold")
        stdout.print(table)
    if result.perplexity is not None:
        p = result.perplexity
        line(
            f"perplexity {p.perplexity:.4f} on {p.data}: {p.windows} windows x {p.seqlen} tokens "
            f"({p.predicted_tokens} predicted), BOS per window: {'yes' if p.bos_per_window else 'no'}, "
            f"{p.dtype} on {p.device}, {p.wall_time_s:.1f} s"
        )
    if result.zeroshot is not None:
        _accuracy(result.zeroshot)


def _accuracy(zeroshot: Any) -> None:
    """One row per task: what was run (version, shots, questions) and the two accuracies with their stderr."""

    def with_stderr(value: float | None, error: float | None) -> str:
        if value is None:
            return "-"
        return f"{value:.4f}" + (f" ± {error:.4f}" if error is not None else "")

    table = _table(
        f"multiple-choice accuracy (lm-eval {zeroshot.lm_eval_version})",
        ["task", "version", "shots", "n", "acc", "acc_norm"],
        left=("task",),
    )
    for task in zeroshot.tasks:
        table.add_row(
            task.task,
            task.version,
            str(task.num_fewshot),
            str(task.samples),
            with_stderr(task.acc, task.acc_stderr),
            with_stderr(task.acc_norm, task.acc_norm_stderr),
        )
    stdout.print(table)
    line(f"{zeroshot.dtype} on {zeroshot.device}, batch size {zeroshot.batch_size}, {zeroshot.wall_time_s:.1f} s")


def generate(result: Any) -> None:
    stdout.print(result.text, highlight=False, markup=False)
    where = (f"{result.sparse_layers} layers on the {result.kernel} kernel ({result.kernel_path})"
             if result.kernel_path else "dense fp32")
    prefill = "" if result.prefill_ms != result.prefill_ms else f"prefill {result.prefill_ms:.0f} ms, "
    stderr.print(f"{result.new_tokens} tokens after a {result.prompt_tokens}-token prompt: {prefill}"
                 f"{result.ms_per_token:.1f} ms per token ({result.tokens_per_s:.1f} tokens/s); {result.engine}, "
                 f"{where}, {result.threads} thread(s)", highlight=False)


def inspect(result: Any, model: str) -> None:
    columns = ["block", "zeros"]
    if result.per_block_rates is not None:
        columns.append(f"target ({result.allocation or 'given'})")
    if result.ranks is not None:
        columns.append("rank")
    table = _table(f"{model}: {result.global_sparsity:.2%} of the block linear weights are zero", columns)
    for index, zeros in enumerate(result.per_block_sparsity):
        row = [str(index), f"{zeros:.4f}"]
        if result.per_block_rates is not None:
            row.append(f"{result.per_block_rates[index]:.4f}")
        if result.ranks is not None:
            row.append(str(result.ranks[index]))
        table.add_row(*row)
    stdout.print(table)
    for depth, step in enumerate(result.lineage):
        line(f"{'  ' * depth}<- {step['command']} ({step['created']}): {' '.join(step['argv'] or [])}")
    if result.plot:
        line(f"plot written to {result.plot}")


def run(result: Any) -> None:
    table = _table(
        f"losa run -> {result.out}", ["stage", "this run", "time", "folder"], left=("stage", "this run", "folder")
    )
    for stage in result.stages:
        table.add_row(stage.name, stage.status, f"{stage.wall_time_s:.1f} s", stage.folder)
    stdout.print(table)
    if result.perplexity_before is not None and result.perplexity_after is not None:
        line(f"perplexity {result.perplexity_before:.4f} (input) -> {result.perplexity_after:.4f} (final)")
    if result.global_sparsity is not None:
        line(f"final model {result.final_model}: {result.global_sparsity:.2%} of the block linear weights are zero")
    speedups(result.speedups)
    line(f"report written to {result.report}; lineage: losa inspect {result.final_model}")
