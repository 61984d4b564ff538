"""Broken checkpoints a careless user hands to every command that loads a model: one ``error:`` line, a
non-zero exit, nothing written and the input untouched (``test_bad_input.assert_one_line_nothing_written``).

Silent garbage is the worst outcome: a checkpoint lacking a tensor, or holding something other than the
model's weights, used to load as randomly initialised weights and be pruned, exported, timed or generated
from with exit 0; NaN/inf weights were pruned and saved.  A sharded checkpoint with a shard missing,
truncated, corrupt or of the wrong shape, or a broken index, gave a traceback on one path or the other.
Each case runs on the in-memory path and, for ``losa prune``, on ``--low-memory`` (``core/offload.py``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_bad_input import (  # noqa: F401 - no_network and shared: fixtures of the cases
    BINARY,
    Case,
    Ctx,
    assert_one_line_nothing_written,
    bench,
    eval_,
    export,
    no_network,
    prune,
    recover,
    shared,
)

INDEX = "model.safetensors.index.json"
Edit = Callable[[dict[str, torch.Tensor]], None]


def edited(ctx: Ctx, edit: Edit) -> Path:
    """A copy of the shared model whose weights ``edit`` changed in place (names, values, shapes)."""
    folder = ctx.model_copy()
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def drop(name: str) -> Edit:
    return lambda tensors: tensors.pop(name)


def add(name: str) -> Edit:
    return lambda tensors: tensors.update({name: torch.zeros(4)})


def packed_kernel_file(tensors: dict[str, torch.Tensor]) -> None:
    """What a user might save by mistake: packed-kernel tensors instead of the model's weights."""
    tensors.clear()
    tensors.update({"q_proj.mask": torch.zeros(64, 4, dtype=torch.uint8), "q_proj.values": torch.zeros(512)})


def poison(name: str, value: float, where: tuple[int, int] = (0, 0)) -> Edit:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = tensors[name].clone()
        tensors[name][where] = value

    return edit


def reshape(name: str) -> Edit:
    return lambda tensors: tensors.update({name: tensors[name][:3].clone()})


def sharded(ctx: Ctx, broken: Callable[[Path, list[str]], None] | None = None) -> Path:
    """The shared model as three shards and an index, as ``save_pretrained`` writes big models; ``broken``
    then damages the folder (given the shard file names)."""
    folder = ctx.model_copy("sharded")
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names, files, weight_map = sorted(tensors), [], {}
    for number, chunk in enumerate((names[:7], names[7:14], names[14:]), start=1):
        files.append(f"model-{number:05d}-of-00003.safetensors")
        save_file({n: tensors[n] for n in chunk}, folder / files[-1], metadata={"format": "pt"})
        weight_map.update({n: files[-1] for n in chunk})
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if broken:
        broken(folder, files)
    return folder


def shard_missing(folder: Path, files: list[str]) -> None:
    (folder / files[1]).unlink()


def shard_truncated(folder: Path, files: list[str]) -> None:
    data = (folder / files[1]).read_bytes()
    (folder / files[1]).write_bytes(data[: len(data) // 2])


def shard_corrupt(folder: Path, files: list[str]) -> None:
    (folder / files[1]).write_bytes(BINARY)


def shard_wrong_shape(folder: Path, files: list[str]) -> None:
    tensors = load_file(folder / files[1])
    first = sorted(tensors)[0]
    tensors[first] = tensors[first][:1].clone()
    save_file(tensors, folder / files[1], metadata={"format": "pt"})


def shard_dangling_link(folder: Path, files: list[str]) -> None:
    (folder / files[1]).unlink()
    os.symlink(folder / "nowhere.safetensors", folder / files[1])


def index_text(text: str) -> Callable[[Path, list[str]], None]:
    return lambda folder, files: (folder / INDEX).write_text(text)


def index_names_a_missing_file(folder: Path, files: list[str]) -> None:
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"][sorted(index["weight_map"])[0]] = "model-00009-of-00009.safetensors"
    (folder / INDEX).write_text(json.dumps(index))


def index_misplaces_a_tensor(folder: Path, files: list[str]) -> None:
    index = json.loads((folder / INDEX).read_text())
    name = next(n for n, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][name] = files[1]
    (folder / INDEX).write_text(json.dumps(index))


SHARD_DAMAGE = (
    ("shard-missing", shard_missing),
    ("shard-truncated", shard_truncated),
    ("shard-corrupt", shard_corrupt),
    ("shard-wrong-shape", shard_wrong_shape),
    ("shard-dangling-link", shard_dangling_link),
)
#: without --low-memory / --in-memory, prune first reads the index to decide (``offload.should_stream``)
INDEX_DAMAGE = (
    ("index-truncated", lambda folder, files: index_text((folder / INDEX).read_text()[:40])(folder, files)),
    ("index-empty", index_text("")),
    ("index-without-weight-map", index_text('{"metadata": {}}')),
    ("index-a-list", index_text("[1, 2]")),
    ("index-weight-map-a-list", index_text('{"weight_map": ["a"]}')),
    ("index-names-a-missing-file", index_names_a_missing_file),
    ("index-misplaces-a-tensor", index_misplaces_a_tensor),
)
Q0 = "model.layers.0.self_attn.q_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"
LOW = "--low-memory"


def generate(ctx: Ctx, model: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--prompt", "the river", "--max-new-tokens", "2", *extra]


CASES: list[Case] = [
    # a tensor missing, or a file holding something else: never random weights
    ("prune-tensor-missing", lambda c: prune(c, model=edited(c, drop(UP1)))),
    ("prune-low-memory-tensor-missing", lambda c: prune(c, LOW, model=edited(c, drop(UP1)))),
    ("prune-low-memory-embedding-missing", lambda c: prune(c, LOW, model=edited(c, drop("model.embed_tokens.weight")))),
    ("eval-tensor-missing", lambda c: eval_(c, "--data", str(c.calib), model=edited(c, drop("lm_head.weight")))),
    ("export-tensor-missing", lambda c: export(c, model=edited(c, drop(Q0)))),
    ("generate-tensor-missing", lambda c: generate(c, edited(c, drop(Q0)))),
    ("bench-tensor-missing", lambda c: bench(c, edited(c, drop(Q0)))),
    ("inspect-tensor-missing", lambda c: ["inspect", str(edited(c, drop(Q0)))]),
    ("recover-tensor-missing", lambda c: [*recover(c)[:2], str(edited(c, drop(Q0))), *recover(c)[3:]]),
    ("prune-tensor-unexpected", lambda c: prune(c, model=edited(c, add("model.layers.0.mlp.packed")))),
    ("prune-low-memory-tensor-unexpected", lambda c: prune(c, LOW, model=edited(c, add("extra.weight")))),
    ("generate-packed-kernel-file", lambda c: generate(c, edited(c, packed_kernel_file))),
    ("prune-packed-kernel-file", lambda c: prune(c, model=edited(c, packed_kernel_file))),
    ("prune-tensor-wrong-shape", lambda c: prune(c, model=edited(c, reshape(UP1)))),
    ("prune-low-memory-tensor-wrong-shape", lambda c: prune(c, LOW, model=edited(c, reshape(UP1)))),
    # NaN/inf weights: refused by every method before any work
    ("prune-wanda-nan", lambda c: prune(c, "--method", "wanda", model=edited(c, poison(Q0, float("nan"))))),
    ("prune-sparsegpt-nan", lambda c: prune(c, "--method", "sparsegpt", model=edited(c, poison(Q0, float("nan"))))),
    ("prune-magnitude-inf", lambda c: prune(c, "--method", "magnitude", model=edited(c, poison(UP1, float("inf"))))),
    ("prune-low-memory-nan", lambda c: prune(c, LOW, model=edited(c, poison(UP1, float("nan"))))),
    ("prune-embedding-inf", lambda c: prune(c, model=edited(c, poison("model.embed_tokens.weight", -float("inf"))))),
    ("prune-float16-overflow", lambda c: prune(c, "--dtype", "float16", model=edited(c, poison(Q0, 1e6)))),
    ("recover-nan", lambda c: [*recover(c)[:2], str(edited(c, poison(Q0, float("nan")))), *recover(c)[3:]]),
    ("generate-nan", lambda c: generate(c, edited(c, poison(Q0, float("nan"))))),
    ("export-nan", lambda c: export(c, "--onnx", model=edited(c, poison(Q0, float("nan"))))),
    ("eval-nan", lambda c: eval_(c, "--data", str(c.calib), model=edited(c, poison("lm_head.weight", float("nan"))))),
    # sharded checkpoints: shards and index, on both paths
    *[
        (f"prune-{path}-{name}", lambda c, broken=broken, flag=flag: prune(c, *flag, model=sharded(c, broken)))
        for path, flag in (("in-memory", ["--in-memory"]), ("low-memory", [LOW]), ("auto", []))
        for name, broken in (*(SHARD_DAMAGE if path != "auto" else ()), *INDEX_DAMAGE)
    ],
    ("eval-shard-truncated", lambda c: eval_(c, "--sparsity", model=sharded(c, shard_truncated))),
    ("export-index-truncated", lambda c: export(c, model=sharded(c, index_text('{"weight_map": {')))),
    ("inspect-shard-missing", lambda c: ["inspect", str(sharded(c, shard_missing))]),
    # neighbours: the single weights file a link to nowhere, a folder, empty on --low-memory
    ("prune-weights-dangling-link", lambda c: prune(c, model=_dangling_weights(c))),
    ("prune-low-memory-weights-a-folder", lambda c: prune(c, LOW, model=_weights_folder(c))),
    ("prune-low-memory-weights-empty", lambda c: prune(c, LOW, model=_empty_weights(c))),
    ("prune-low-memory-two-weight-files", lambda c: prune(c, LOW, model=_two_weight_files(c))),
]


def _dangling_weights(ctx: Ctx) -> Path:
    folder = ctx.model_copy()
    (folder / "model.safetensors").unlink()
    os.symlink(folder / "gone.safetensors", folder / "model.safetensors")
    return folder


def _weights_folder(ctx: Ctx) -> Path:
    folder = ctx.model_copy()
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").mkdir()
    (folder / "other.safetensors").write_bytes(b"")
    return folder


def _empty_weights(ctx: Ctx) -> Path:
    folder = ctx.model_copy()
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def _two_weight_files(ctx: Ctx) -> Path:
    folder = ctx.model_copy()
    (folder / "model.safetensors").rename(folder / "a.safetensors")
    (folder / "b.safetensors").write_bytes((folder / "a.safetensors").read_bytes())
    return folder


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_broken_checkpoint_one_line_nothing_written(case: Case, shared, tmp_path, no_network, monkeypatch):  # noqa: F811
    assert_one_line_nothing_written(case, shared, tmp_path, monkeypatch)
