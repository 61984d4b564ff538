"""Zero-shot (and few-shot) multiple-choice accuracy through lm-eval, for ``losa eval --tasks``.

lm-eval is the harness pruning papers report accuracy with, so its prompts and scoring are used
as they are: each choice is scored as the continuation ``" " + choice`` after the query (context
and context + continuation each tokenised, the continuation being the tokens past the context's),
``acc`` picks the choice with the highest summed log-likelihood, and ``acc_norm`` the highest
log-likelihood per character of the choice.  lm-eval's ``HFLM`` wraps the model object losa
loaded, so the weights scored are the ones the other measurements see, in the same dtype.

A task is either an lm-eval task name (``hellaswag``, ``arc_easy``: data from the Hugging Face
Hub, refused at once when the Hub cannot be reached) or a local JSONL file, one question a line::

    {"query": "The capital of France is", "choices": ["Paris", "Rome", "Oslo"], "gold": 0}

``query`` may also be named ``context`` or ``question``, ``gold`` ``label`` or ``answer``; gold
is the index of the right choice.  The file is checked line by line before any model is loaded,
then a task YAML pointing at a normalised copy is generated in a temporary folder (task name:
the file's stem), so a local task never touches the network.  Few-shot examples of a local task
come from the same file, never the question itself.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import re
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any

import torch

from ..core.data import jsonl_lines
from ..core.errors import ConfigError, DataError
from ..core.hub import hub_unreachable
from ..core.sequential import ProgressFn
from ..core.text import decode_json_text

QUERY_KEYS = ("query", "context", "question")
GOLD_KEYS = ("gold", "label", "answer")
FEWSHOT_SEED = 1234  # lm-eval's default few-shot seed, so few-shot prompts match its CLI's
PROGRESS = "zero-shot requests"  # one log-likelihood request per (question, choice)


@dataclass
class LocalTask:
    """A checked local task file: its lm-eval name, where it came from and its normalised rows."""

    name: str
    path: Path
    sha256: str
    rows: list[dict[str, Any]]
    lines: list[int]  # the file's line of each row


@dataclass
class TaskAccuracy:
    """One task's accuracy, with what is needed to reproduce it (version, shots, source)."""

    task: str
    source: str  # the local file, or "lm-eval" for a task lm-eval ships
    sha256: str | None  # of the local file
    version: str
    num_fewshot: int
    fewshot_delimiter: str
    target_delimiter: str
    samples: int
    acc: float | None
    acc_stderr: float | None
    acc_norm: float | None
    acc_norm_stderr: float | None


@dataclass
class ZeroShotResult:
    """Every task's accuracy and the run's settings (recorded with ``--json`` and in ``losa run``'s manifest)."""

    tasks: list[TaskAccuracy]
    lm_eval_version: str
    fewshot_seed: int
    limit: int | None
    batch_size: int
    dtype: str
    device: str
    wall_time_s: float


def _first_of(row: dict, keys: tuple[str, ...]) -> Any:
    return next((row[key] for key in keys if key in row), None)


def _check_row(row: Any, where: str) -> dict[str, Any]:
    """One line of a local task, normalised to query/choices/gold, or a DataError naming the line."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with query, choices and gold")
    query, choices, gold = _first_of(row, QUERY_KEYS), row.get("choices"), _first_of(row, GOLD_KEYS)
    if not isinstance(query, str) or not query.strip():  # lm-eval cannot score a choice after a blank context
        raise DataError(f"{where}: needs a non-blank text field {' / '.join(QUERY_KEYS)}")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise DataError(f"{where}: choices must be a list of at least two non-empty strings")
    if isinstance(gold, bool) or not isinstance(gold, int):
        raise DataError(f"{where}: needs an integer {' / '.join(GOLD_KEYS)}, the index of the right choice")
    if not 0 <= gold < len(choices):
        raise DataError(f"{where}: gold index {gold} is out of range for {len(choices)} choices")
    return {"query": query, "choices": choices, "gold": gold}


def read_local_task(path: Path, name: str) -> LocalTask:
    """Read and check a JSONL task file completely, so a bad line fails before the model loads."""
    if not path.is_file():
        raise DataError(f"task file {path} does not exist (or is not a file)")
    text, raw = decode_json_text(path)
    parsed = [(number, _check_row(row, f"{path}:{number}")) for number, row in jsonl_lines(path, text)]
    if not parsed:
        raise DataError(f"task file {path} has no questions")
    return LocalTask(name=name, path=path.resolve(), sha256=hashlib.sha256(raw).hexdigest(),
                     rows=[row for _, row in parsed], lines=[number for number, _ in parsed])


def is_local_task(spec: str) -> bool:
    """A spec naming a file (by suffix or path separator) is local; anything else is an lm-eval name."""
    return spec.endswith(".jsonl") or "/" in spec or "\\" in spec or Path(spec).is_file()


def resolve_tasks(specs: list[str]) -> list[LocalTask | str]:
    """Check every ``--tasks`` item before any model loads: local files fully, lm-eval names for reachability."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("--tasks needs lm-eval: pip install 'losa[zeroshot]' (or lm_eval==0.4.13)")
    resolved: list[LocalTask | str] = []
    taken: set[str] = {spec for spec in specs if not is_local_task(spec)}
    for spec in specs:
        if not is_local_task(spec):
            resolved.append(spec)
            continue
        path = Path(spec)
        if path.suffix != ".jsonl":
            raise DataError(f"task file {path}: a local task must be a .jsonl file (one question a line, see README)")
        name = base = re.sub(r"\W+", "_", path.stem).strip("_") or "task"
        suffix = 2
        while name in taken:  # two files with the same stem stay two tasks
            name, suffix = f"{base}_{suffix}", suffix + 1
        taken.add(name)
        resolved.append(read_local_task(path, name))
    hub_names = [spec for spec in resolved if isinstance(spec, str)]
    if hub_names:
        reason = hub_unreachable()
        if reason:
            raise DataError(
                f"lm-eval task {hub_names[0]!r} downloads from the Hugging Face Hub, which cannot be reached "
                f"({reason}): give a local multiple-choice .jsonl task file instead"
            )
    return resolved


def _write_task_folder(tasks: list[LocalTask], folder: Path) -> None:
    """A task YAML and a normalised JSONL per local task; the datasets cache stays in ``folder`` too."""
    import yaml

    for task in tasks:
        data = folder / f"{task.name}.data.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in task.rows), encoding="utf-8")
        config = {
            "task": task.name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder / "datasets-cache")},
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": "query",
            "doc_to_choice": "choices",
            "doc_to_target": "gold",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
            "metadata": {"version": 1.0},
        }
        (folder / f"{task.name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


@contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """Keep lm-eval's logging, bars and prints off losa's output, so stderr shows losa's progress only
    and ``--json`` stdout stays parseable.

    lm-eval has no switch for this: its logger is raised to ERROR, ``datasets`` bars are turned off,
    the one bar lm-eval draws without a ``disable`` argument (building each task's requests) gets
    one, and stdout is captured.  stderr itself is not captured: losa's progress bars live there.
    """
    import datasets
    import lm_eval.api.task

    logger = logging.getLogger("lm_eval")
    level, bars_on, task_bar = logger.level, datasets.is_progress_bar_enabled(), lm_eval.api.task.tqdm
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    lm_eval.api.task.tqdm = functools.partial(task_bar, disable=True)
    try:
        with warnings.catch_warnings(), redirect_stdout(StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
        lm_eval.api.task.tqdm = task_bar
        if bars_on:
            datasets.enable_progress_bars()


@contextmanager
def _datasets_network(allowed: bool) -> Iterator[None]:
    """No download-count ping from ``datasets`` (it sends one even for a local JSON file, waiting up to
    3 s without a network), and no network at all when every task is a local file."""
    import datasets.config

    saved = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS, datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    datasets.config.HF_HUB_OFFLINE = saved[1] or not allowed
    try:
        yield
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS, datasets.config.HF_HUB_OFFLINE = saved


class _RequestCounter:
    """Stands in for the tqdm bar lm-eval's HFLM draws over its log-likelihood requests: every request
    scored is reported to losa's progress (the first report before any is scored), so a long ``--tasks``
    run shows it is alive from the start.  Accepts tqdm's arguments, iterable or ``total``."""

    def __init__(self, progress: ProgressFn, iterable: Any = None, total: int | None = None, **_: Any) -> None:
        self.progress, self.iterable, self.done = progress, iterable, 0
        self.total = total if total is not None else len(iterable) if hasattr(iterable, "__len__") else 0
        progress(PROGRESS, 0, self.total)

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            yield item
            self.update()

    def update(self, n: int = 1) -> None:
        self.done += n
        self.progress(PROGRESS, self.done, max(self.total, self.done))

    def close(self) -> None:
        pass


@contextmanager
def _scoring_progress(lm: Any, progress: ProgressFn | None) -> Iterator[None]:
    """lm-eval's own bars off, and each scored request reported to ``progress`` (``_RequestCounter``)."""
    import lm_eval.models.huggingface as hflm

    score, bar = lm.loglikelihood, hflm.tqdm
    lm.loglikelihood = lambda requests, disable_tqdm=True: score(requests, disable_tqdm=True)
    if progress:
        hflm.tqdm = functools.partial(_RequestCounter, progress)
    try:
        yield
    finally:
        hflm.tqdm = bar


def _check_fits(tasks: list[LocalTask], num_fewshot: int, tokenizer: Any, max_length: int) -> None:
    """What lm-eval would stop on with an assertion, said first: more shots than other questions to draw
    them from, and a choice as long as the model's context (a long query is cut from the left, as lm-eval does)."""
    for task in tasks:
        if num_fewshot >= len(task.rows):
            raise DataError(
                f"--num-fewshot {num_fewshot} needs at least {num_fewshot + 1} questions in {task.path} (the shots "
                f"are its other questions), and it holds {len(task.rows)}: lower --num-fewshot or add questions"
            )
        for row, line in zip(task.rows, task.lines):
            for number, choice in enumerate(row["choices"]):
                length = len(tokenizer(" " + choice, add_special_tokens=False).input_ids)
                if length >= max_length:
                    raise DataError(
                        f"{task.path}:{line}: choice {number} is {length} tokens, no shorter than the model's context "
                        f"of {max_length}: lm-eval cannot score it; shorten it"
                    )


def _load_tasks(specs: list[LocalTask | str], folder: Path) -> dict[str, Any]:
    """lm-eval Task objects by name; unknown or unloadable names become a one-line DataError."""
    from lm_eval.tasks import TaskManager

    hub_names = [spec for spec in specs if isinstance(spec, str)]
    manager = TaskManager(include_path=str(folder), include_defaults=bool(hub_names))  # the full index takes ~15 s
    for name in hub_names:
        if name not in manager.all_tasks:
            raise DataError(
                f"unknown lm-eval task {name!r}: give a task lm-eval lists, or a path to a .jsonl task file"
            )
    names = [spec if isinstance(spec, str) else spec.name for spec in specs]
    try:
        loaded = manager.load(names)
    except Exception as exc:  # noqa: BLE001 - datasets and lm-eval raise many kinds; the message says what
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot load the lm-eval tasks {', '.join(names)}: {first}") from exc
    for name, task in loaded["tasks"].items():
        if task.get_config("output_type") != "multiple_choice":
            raise ConfigError(
                f"lm-eval task {name!r} is {task.get_config('output_type')}: losa eval --tasks "
                "reports multiple-choice accuracy only"
            )
    return loaded


def _task_accuracy(name: str, results: dict, local: LocalTask | None) -> TaskAccuracy:
    """Pick one task's numbers out of lm-eval's result dict ("acc,none" keys: metric, filter)."""
    scores, config = results["results"][name], results["configs"][name]

    def metric(key: str) -> float | None:
        value = scores.get(f"{key},none")
        return float(value) if isinstance(value, (int, float)) else None  # stderr may be "N/A"

    return TaskAccuracy(
        task=name,
        source=str(local.path) if local else "lm-eval",
        sha256=local.sha256 if local else None,
        version=str(results["versions"][name]),
        num_fewshot=int(results["n-shot"][name]),
        fewshot_delimiter=config.get("fewshot_delimiter", "\n\n"),
        target_delimiter=config.get("target_delimiter", " "),
        samples=int(results["n-samples"][name]["effective"]),
        acc=metric("acc"),
        acc_stderr=metric("acc_stderr"),
        acc_norm=metric("acc_norm"),
        acc_norm_stderr=metric("acc_norm_stderr"),
    )


def run_zeroshot(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: list[LocalTask | str],
    num_fewshot: int = 0,
    limit: int | None = None,
    batch_size: int = 1,
    device: torch.device | None = None,
    progress: ProgressFn | None = None,
) -> ZeroShotResult:
    """Accuracy of ``model`` on each task (checked by ``resolve_tasks``) through lm-eval's ``HFLM``.

    The model is scored in its own dtype on ``device``; ``num_fewshot`` replaces each task's own
    default (except where a task fixes 0 shots, as lm-eval does), and the shots actually used are
    reported per task.
    """
    import lm_eval
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    if device is not None:
        model.to(device)
    local = {spec.name: spec for spec in tasks if isinstance(spec, LocalTask)}
    started = time.perf_counter()
    hub_tasks = any(isinstance(spec, str) for spec in tasks)
    with (
        tempfile.TemporaryDirectory(prefix="losa-tasks-") as folder,
        _datasets_network(allowed=hub_tasks),
        _quiet_lm_eval(),
    ):
        _write_task_folder(list(local.values()), Path(folder))
        loaded = _load_tasks(tasks, Path(folder))
        for task in loaded["tasks"].values():
            if task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=num_fewshot)
            task.set_fewshot_seed(seed=FEWSHOT_SEED)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        _check_fits(list(local.values()), num_fewshot, tokenizer, lm.max_length)
        with _scoring_progress(lm, progress):
            try:
                results = evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=False)
            except (AssertionError, ValueError) as exc:  # a Hub task's data lm-eval cannot score
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise DataError(f"lm-eval could not score {', '.join(loaded['tasks'])}: {first}") from exc
    accuracies = [_task_accuracy(name, results, local.get(name)) for name in loaded["tasks"]]
    return ZeroShotResult(
        tasks=accuracies,
        lm_eval_version=lm_eval.__version__,
        fewshot_seed=FEWSHOT_SEED,
        limit=limit,
        batch_size=batch_size,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        device=str(next(model.parameters()).device),
        wall_time_s=time.perf_counter() - started,
    )
