"""The dense teacher's top-K logits, cached on disk for distillation (``teacher_topk=K``).

The live teacher (``training.dense_teacher``) is a second copy of the model in memory and a second
forward pass every step.  With ``teacher_topk=K`` the run instead makes one pass of the dense input
model over exactly the micro-batches training will draw -- ``Batches.micro(i)`` for every index of
every stage, seeded and fixed in advance -- before any adapter is attached or any weight pruned, and
writes per attended token the K largest logits (float16, shifted by the row's largest), their indices
(int32) and the logsumexp of the whole row at the distillation temperature (float32):
K x (2 + 4) + 4 bytes per token (``losses.top_rows``).  Then no teacher exists during training; the
loss reads the rows of each micro-batch (``losses.cached_kd_loss``).

Layout, in ``OUT.teacher/`` beside the output: ``rank<r>-<chunk>.safetensors``, each holding the rows of
``per_file`` consecutive micro-batches of process r (tensors ``<index>.values/.indices/.lse``), written
one chunk at a time (memory stays bounded) to a temporary name and renamed; then ``rank<r>.json``, the
index: the key the rows depend on, every file's SHA-256, the tokens and the seconds of the pass.  A
run (a resumed one too) reuses a cache whose key and hashes all match on every process; otherwise it
rebuilds it (the rows are a pure function of the key, so a rebuilt cache holds the same rows).  A
successful run removes the folder, as it removes its checkpoint.

Every process caches the rows of its own micro-batches (DDP and FSDP alike: under FSDP the pass runs a
sharded copy of the dense model, collectively, and frees it), so the folder must be one every process
can read and write: one machine, or a shared file system.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from ..core.atomic import disk_errors, file_sha256
from ..core.errors import ConfigError, key
from ..core.sequential import ProgressFn
from .losses import top_rows
from .sharding import shard
from .training import Batches, dense_teacher

#: the file layout; a cache of another version is rebuilt
FORMAT = 1
#: rows written per file, at most (the pass holds one file's rows in memory)
CHUNK_BYTES = 64 << 20
ROW_KINDS = ("values", "indices", "lse")


def cache_folder(out: Path) -> Path:
    return out.with_name(out.name + ".teacher")


def bytes_per_token(k: int) -> int:
    """K float16 logits + K int32 indices + one float32 logsumexp."""
    return k * (2 + 4) + 4


@dataclass
class TeacherRows:
    """This process's cached rows, read one micro-batch at a time (memory-mapped, one file open at a time)."""

    folder: Path
    rank: int
    per_file: int
    record: dict = field(default_factory=dict)  # what the manifest says about the cache
    _open: tuple[int, object] | None = None

    def rows(self, index: int) -> dict[str, torch.Tensor]:
        """Micro-batch ``index``'s rows on this process: ``teacher_values``, ``teacher_indices``, ``teacher_lse``."""
        chunk = index // self.per_file
        if self._open is None or self._open[0] != chunk:
            self._open = (chunk, safe_open(str(self.folder / _file(self.rank, chunk)), framework="pt"))
        handle = self._open[1]
        return {f"teacher_{kind}": handle.get_tensor(f"{index}.{kind}") for kind in ROW_KINDS}

    def close(self) -> None:
        self._open = None


def vocabulary(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def check_topk(k: int, model: nn.Module) -> None:
    """Refuse a K above the vocabulary, before any work (the config cannot know the vocabulary)."""
    if k > vocabulary(model):
        raise ConfigError(f"{key('teacher_topk')} {k} exceeds the model's vocabulary of {vocabulary(model)} tokens; "
                          f"use at most {vocabulary(model)} (the whole row)")


def prepare_teacher_cache(config, accelerator, model: nn.Module, source: dict, batches: Batches, fsdp: dict | None,
                          warnings: list[str], progress: ProgressFn | None) -> TeacherRows:
    """Reuse the cache of ``OUT.teacher`` when it matches this run on every process, else build it with ``model``
    (the dense input model: call before any adapter is attached or weight pruned)."""
    k = config.teacher_topk
    check_topk(k, model)
    folder = cache_folder(Path(config.out).expanduser().resolve())
    micro_batches = sum(config.plan_steps()) * config.grad_accum
    wanted = {
        "format": FORMAT,
        "teacher_topk": k,
        "kd_temperature": config.kd_temperature,
        "model": source,
        "dtype": str(config.dtype),
        "weights": weights_fingerprint(model),
        "examples": examples_hash(batches.examples),
        "batch_size": batches.batch_size,
        "seed": batches.seed,
        "processes": batches.world,
        "micro_batches": micro_batches,
    }
    per_file = max(1, CHUNK_BYTES // (batches.batch_size * config.max_length * bytes_per_token(k)))
    rank = batches.rank
    index, problem = _check(folder, rank, wanted)
    agreed = accelerator.gather(torch.tensor([int(problem is None)], device=accelerator.device)).min() == 1
    if bool(agreed):
        reused = True
    else:
        reused = False
        if index is not None:  # a cache that does not fit this run: say so once, then replace it
            warnings.append(f"the teacher cache in {folder} did not match this run ({problem}); rebuilt it")
        index = _build(folder, rank, wanted, per_file, model, batches, fsdp, accelerator, progress)
    accelerator.wait_for_everyone()
    indexes = [json.loads((folder / _index(r)).read_text()) for r in range(batches.world)]
    rows = TeacherRows(folder, rank, index["per_file"])
    rows.record = {
        "teacher_topk": k,
        "tokens": sum(i["tokens"] for i in indexes),
        "bytes_per_token": bytes_per_token(k),
        "bytes": sum((folder / name).stat().st_size for i in indexes for name in i["files"]),
        "teacher_seconds": max(i["seconds"] for i in indexes),
        "reused": reused,
    }
    return rows


def _check(folder: Path, rank: int, wanted: dict) -> tuple[dict | None, str | None]:
    """This process's index and why it cannot be reused (None: it can)."""
    path = folder / _index(rank)
    if not path.is_file():
        return None, "no cache"
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}, "an unreadable index"
    differ = [name for name, value in wanted.items() if index.get("key", {}).get(name) != value]
    if differ:
        return index, f"other {', '.join(differ)}"
    for name, digest in index.get("files", {}).items():
        if not (folder / name).is_file() or file_sha256(folder / name) != digest:
            return index, f"{name} is missing or changed"
    return index, None


@torch.no_grad()
def _build(folder: Path, rank: int, wanted: dict, per_file: int, model: nn.Module, batches: Batches,
           fsdp: dict | None, accelerator, progress: ProgressFn | None) -> dict:
    """One pass of the dense teacher over this process's micro-batches, written chunk by chunk."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / _index(rank)).unlink(missing_ok=True)  # the index goes last: without it the rows are not trusted
    for stale in folder.glob(f"rank{rank}-*.safetensors"):
        stale.unlink()
    started = time.perf_counter()
    teacher = shard(dense_teacher(model, torch.device("cpu")), batches.device, batches.world, fsdp) if fsdp \
        else model.to(batches.device)
    was_training = teacher.training
    teacher.eval()
    k, temperature, total = wanted["teacher_topk"], wanted["kd_temperature"], wanted["micro_batches"]
    files: dict[str, str] = {}
    chunk: dict[str, torch.Tensor] = {}
    tokens = 0
    for step in range(total):
        batch = batches.micro(step)
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        rows = top_rows(logits, batch["attention_mask"], k, temperature)
        del logits
        for kind, tensor in zip(ROW_KINDS, rows):
            chunk[f"{step}.{kind}"] = tensor.cpu().contiguous()
        tokens += int(rows[2].shape[0])
        if (step + 1) % per_file == 0 or step + 1 == total:
            name = _file(rank, step // per_file)
            files[name] = _write(folder / name, save(chunk))
            chunk = {}
        if progress:
            progress("teacher cache", step + 1, total, f"{tokens} tokens")
    teacher.train(was_training)
    if fsdp:
        del teacher
        gc.collect()
    index = {"key": wanted, "files": files, "per_file": per_file, "tokens": tokens,
             "seconds": time.perf_counter() - started}
    _write(folder / _index(rank), json.dumps(index, indent=1).encode())
    return index


def _write(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically (a temporary sibling renamed over it); its SHA-256."""
    with disk_errors(path):
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    return hashlib.sha256(data).hexdigest()


def remove_cache(rows: TeacherRows | None) -> None:
    if rows is not None:
        rows.close()
        shutil.rmtree(rows.folder, ignore_errors=True)


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 of every tensor's name, shape, dtype and ~1k values strided over it: tells two teachers apart
    without reading all of a large model (the model's spec and dtype are in the key too)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)].float().cpu()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def examples_hash(examples: list[dict[str, torch.Tensor]]) -> str:
    """SHA-256 of the fine-tuning examples' token ids, in order (what the teacher reads)."""
    digest = hashlib.sha256()
    for example in examples:
        ids = example["input_ids"].to(torch.int64).contiguous()
        digest.update(len(ids).to_bytes(8, "little"))
        digest.update(ids.numpy().tobytes())
    return digest.hexdigest()


def _file(rank: int, chunk: int) -> str:
    return f"rank{rank}-{chunk:05d}.safetensors"


def _index(rank: int) -> str:
    return f"rank{rank}.json"
