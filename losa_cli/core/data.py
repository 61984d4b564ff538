"""Text sources -> token windows for calibration and evaluation.

Accepted sources: a ``.txt`` file (documents separated by blank lines, or one per line when the
file has no blank lines), a ``.jsonl`` file (a ``text`` field, or Alpaca-style instruction
records), a folder saved with ``datasets.save_to_disk``, or the Hub names ``c4`` / ``wikitext2``
when online.  Text files are decoded strictly in ``--encoding`` (default ``auto``: a byte-order
mark, else UTF-8, else the detected encoding, named in a warning); no character is ever dropped.
Documents are joined with a blank line and tokenised once, as the perplexity
protocol prescribes; windows are cut from that one token stream.  Calibration can instead draw
each window from one document (``document_windows``), as the Wanda / SparseGPT loaders do.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import AUTO_ENCODING
from .errors import DataError
from .hub import LOCAL_DATA, hub_unreachable, offline_by_env
from .text import decode_text

HUB_DATASETS = {
    "c4": {
        "path": "allenai/c4",
        "data_files": {"train": "en/c4-train.00000-of-01024.json.gz"},
        "split": "train",
        "field": "text",
    },
    "wikitext2": {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "test", "field": "text"},
}
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_instruction(record: dict) -> tuple[str, str]:
    """(prompt, response) of an Alpaca-style record, with the Alpaca template."""
    template = ALPACA_WITH_INPUT if record.get("input") else ALPACA_NO_INPUT
    prompt = template.format(instruction=record["instruction"], input=record.get("input", ""))
    return prompt, str(record.get("output", ""))


def _txt_documents(text: str) -> list[str]:
    separator = "\n\n" if "\n\n" in text else "\n"
    return [doc.strip() for doc in text.split(separator) if doc.strip()]


def jsonl_lines(path: Path, text: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line of a JSONL file's ``text``; a line that
    is not JSON stops with a DataError naming it (``path:line``)."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None


def _jsonl_records(path: Path, text: str) -> list[tuple[int, dict]]:
    """(line number, record) of every non-blank line; each record needs ``text`` or ``instruction``."""
    records = []
    for number, record in jsonl_lines(path, text):
        if not isinstance(record, dict) or ("text" not in record and "instruction" not in record):
            raise DataError(f"{path}:{number}: needs a 'text' field or 'instruction'/'output' fields")
        records.append((number, record))
    return records


def _jsonl_documents(records: list[tuple[int, dict]]) -> list[str]:
    docs = []
    for _, record in records:
        if "text" in record:
            docs.append(str(record["text"]))
        else:
            prompt, response = format_instruction(record)
            docs.append(prompt + response)
    return docs


def _read_saved_dataset(path: Path) -> list[str]:
    from datasets import load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{path} is not a folder saved with datasets.save_to_disk: {exc}") from None
    if hasattr(dataset, "keys"):  # a DatasetDict: take the first split
        dataset = dataset[sorted(dataset.keys())[0]]
    if "text" not in dataset.column_names:
        raise DataError(f"the dataset in {path} has no 'text' column (columns: {', '.join(dataset.column_names)})")
    return [t for t in dataset["text"] if t and t.strip()]


def _read_hub(name: str) -> list[str]:
    spec = dict(HUB_DATASETS[name])
    field = spec.pop("field")
    offline = None if offline_by_env() else hub_unreachable()  # offline mode reads the local cache quickly
    if offline:
        raise DataError(
            f"{name!r} is a Hub dataset and the Hub cannot be reached ({offline}); give {LOCAL_DATA} instead"
        )
    try:
        from datasets import load_dataset

        dataset = load_dataset(**spec)
    except Exception as exc:  # noqa: BLE001 - any network/Hub failure means the same to the user
        raise DataError(
            f"cannot fetch the Hub dataset {name!r} ({type(exc).__name__}); give {LOCAL_DATA} instead"
        ) from None
    return [t for t in dataset[field] if t and t.strip()]


@dataclass
class Documents:
    """What a text source holds, and how its file was read (recorded beside the source)."""

    texts: list[str]
    encoding: str | None = None  # the codec the file was decoded with; None for a saved or Hub dataset (already text)
    records: list[tuple[int, dict]] | None = None  # a .jsonl file's (line number, record) pairs


def load_documents(source: str, encoding: str, what: str, warnings: list[str]) -> Documents:
    """The documents of a text source, in file order, decoded with ``encoding`` (see ``decode_text``);
    when ``auto`` had to detect the encoding, a line naming it (and ``what`` the file is) joins ``warnings``."""
    if source in HUB_DATASETS and not Path(source).exists():
        return _nonempty(source, Documents(_read_hub(source)))
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data file {source} does not exist (or use {' / '.join(HUB_DATASETS)} when online)")
    if path.is_dir():
        return _nonempty(source, Documents(_read_saved_dataset(path)))
    if path.suffix not in (".jsonl", ".txt", ".text", ".md", ""):
        raise DataError(
            f"{source}: unsupported data format {path.suffix!r}; use .txt, .jsonl or a saved datasets folder"
        )
    decoded = decode_text(path, encoding)
    if (warning := decoded.warning(f"{what} {source}")) is not None:
        warnings.append(warning)
    if path.suffix == ".jsonl":
        records = _jsonl_records(path, decoded.text)
        return _nonempty(source, Documents(_jsonl_documents(records), decoded.encoding, records))
    return _nonempty(source, Documents(_txt_documents(decoded.text), decoded.encoding))


def _nonempty(source: str, documents: Documents) -> Documents:
    if not documents.texts:
        raise DataError(f"{source} holds no text")
    return documents


def read_documents(source: str, encoding: str = AUTO_ENCODING) -> list[str]:
    """The documents of a text source, for callers that keep no warnings (benchmarks, tests)."""
    return load_documents(source, encoding, "data file", []).texts


def bos_token_to_prepend(tokenizer) -> int | None:
    """The BOS id when the tokenizer adds one to every sequence by default (Llama-2, Gemma), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a").input_ids
    return bos if ids and ids[0] == bos else None


def token_stream(tokenizer, documents: list[str]) -> torch.Tensor:
    """Join documents with a blank line and tokenise once, without special tokens."""
    ids = tokenizer("\n\n".join(documents), add_special_tokens=False).input_ids
    return torch.tensor(ids, dtype=torch.long)


def _with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], dim=1)


def sample_windows(
    stream: torch.Tensor, nsamples: int, seqlen: int, seed: int, bos: int | None, source: str
) -> torch.Tensor:
    """``nsamples`` distinct, non-overlapping windows of ``seqlen`` tokens chosen with ``seed``.

    With a BOS token each window is BOS + ``seqlen - 1`` text tokens, so the model sees what it
    saw in training.
    """
    body = seqlen - (1 if bos is not None else 0)
    available = len(stream) // body
    if available < nsamples:
        raise DataError(
            f"{source} holds {len(stream)} tokens = {available} windows of {seqlen} tokens, "
            f"fewer than the {nsamples} asked for; lower --nsamples or --seqlen, or give more text"
        )
    generator = torch.Generator().manual_seed(seed)
    slack = len(stream) - available * body
    offset = int(torch.randint(0, slack + 1, (1,), generator=generator))
    chosen = torch.randperm(available, generator=generator)[:nsamples]
    starts = offset + chosen * body
    windows = torch.stack([stream[s : s + body] for s in starts.tolist()])
    return _with_bos(windows, bos)


def document_windows(
    tokenizer, documents: list[str], nsamples: int, seqlen: int, seed: int, source: str
) -> torch.Tensor:
    """``nsamples`` windows drawn as the Wanda / SparseGPT C4 loaders draw them, so that a paper's
    protocol can be reproduced window for window.

    A ``random.Random(seed)`` (the same sequence as their ``random.seed(seed)``) picks a document
    with ``randint(0, len - 1)`` until one has more than ``seqlen`` tokens, then a start with
    ``randint(0, tokens - seqlen - 1)``.  Each document is tokenised alone with the tokenizer's
    defaults, so a BOS token is part of the text (at its start) exactly where theirs is; none is
    prepended.  Windows may repeat or overlap, as theirs may.
    """
    rng = random.Random(seed)
    tokens: dict[int, list[int]] = {}
    longest = 0
    windows = []
    for _ in range(nsamples):
        while True:
            index = rng.randint(0, len(documents) - 1)
            if index not in tokens:
                tokens[index] = tokenizer(documents[index]).input_ids
                longest = max(longest, len(tokens[index]))
            if len(tokens[index]) > seqlen:
                break
            if len(tokens) == len(documents) and longest <= seqlen:
                raise DataError(
                    f"no document of {source} is longer than {seqlen} tokens (the longest has {longest}); "
                    "lower --seqlen or use --sampling stream"
                )
        start = rng.randint(0, len(tokens[index]) - seqlen - 1)
        windows.append(tokens[index][start : start + seqlen])
    return torch.tensor(windows, dtype=torch.long)


def consecutive_windows(stream: torch.Tensor, seqlen: int, max_windows: int | None, bos: int | None) -> torch.Tensor:
    """Non-overlapping windows from the start of the stream (the perplexity protocol)."""
    body = seqlen - (1 if bos is not None else 0)
    count = len(stream) // body
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise DataError(
            f"the evaluation text holds {len(stream)} tokens, fewer than one window of {seqlen}; lower --seqlen"
        )
    windows = stream[: count * body].view(count, body)
    return _with_bos(windows, bos)


def _instruction_records(documents: Documents, source: str) -> list[dict] | None:
    """The records of an instruction .jsonl (None when the source holds plain ``text`` records or text)."""
    records = documents.records
    if records is None or not all("instruction" in record for _, record in records):
        return None
    for number, record in records:
        if "output" not in record:
            raise DataError(f"{source}:{number}: instruction record without an 'output' field")
    return [record for _, record in records]


def training_examples(
    tokenizer, source: str, documents: Documents, max_length: int, response_only: bool
) -> list[dict[str, torch.Tensor]]:
    """Fine-tuning examples from ``documents`` (``load_documents(source, ...)``): ``input_ids`` and
    ``labels`` (-100 where no loss is taken).

    Instruction records become Alpaca prompt + response + EOS, truncated to ``max_length``; with
    ``response_only`` the prompt tokens carry no loss.  Plain text is tokenised once and cut into
    full windows of ``max_length`` tokens (no padding, every token counts).
    """
    records = _instruction_records(documents, source)
    examples = []
    if records is not None:
        eos = tokenizer.eos_token_id
        for record in records:
            prompt, response = format_instruction(record)
            prompt_ids = tokenizer(prompt, add_special_tokens=True).input_ids
            response_ids = tokenizer(response, add_special_tokens=False).input_ids + ([eos] if eos is not None else [])
            ids = (prompt_ids + response_ids)[:max_length]
            labels = ([-100] * len(prompt_ids) if response_only else prompt_ids) + response_ids
            labels = labels[:max_length]
            if len(ids) < 2 or all(label == -100 for label in labels[1:]):
                continue
            examples.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)})
    else:
        stream = token_stream(tokenizer, documents.texts)
        bos = bos_token_to_prepend(tokenizer)
        for window in consecutive_windows(stream, max_length, None, bos):
            examples.append({"input_ids": window.clone(), "labels": window.clone()})
    if not examples:
        raise DataError(
            f"{source} yields no training examples: every response lies beyond --max-length {max_length} "
            "tokens (or the text is shorter than one window); raise --max-length"
        )
    return examples


def collate(examples: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding gets attention 0 and label -100."""
    length = max(len(e["input_ids"]) for e in examples)
    batch = {
        "input_ids": torch.full((len(examples), length), pad_id, dtype=torch.long),
        "labels": torch.full((len(examples), length), -100, dtype=torch.long),
        "attention_mask": torch.zeros((len(examples), length), dtype=torch.long),
    }
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        batch["input_ids"][row, :n] = example["input_ids"]
        batch["labels"][row, :n] = example["labels"]
        batch["attention_mask"][row, :n] = 1
    return batch
