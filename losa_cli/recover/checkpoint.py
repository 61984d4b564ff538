"""Resumable checkpoints of ``losa recover`` as safetensors + JSON (no pickles).

A checkpoint holds everything a run needs to continue exactly where it stopped: the blocks'
state (pruned base weights, masks, adapter factors), the optimizer's moments, the learning-rate
schedule, every process's random-number state, and the stage/step counter with the history so
far.  Tensors go to safetensors and everything else to JSON, so loading a checkpoint can never
run code (``torch.load`` / pickle can).  The folder is replaced atomically: written beside the
old one, then renamed.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.errors import LosaError
from .sharding import full_state, shard_state

STATE_FILE = "losa_state.json"
BLOCKS_FILE = "blocks.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_FILE = "trainer.json"


def _rng_file(rank: int) -> str:
    return f"rng_{rank}.safetensors"


def optimizer_to_safe(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors and a JSON-able rest."""
    tensors, rest = {}, {}
    for index, entry in state["state"].items():
        rest[str(index)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                rest[str(index)][key] = value
    return tensors, {"state": rest, "param_groups": state["param_groups"]}


def optimizer_from_safe(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The inverse of :func:`optimizer_to_safe`."""
    state: dict[int, dict] = {int(index): dict(entry) for index, entry in meta["state"].items()}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state[int(index)][key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_to_safe() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's torch / CUDA / numpy / Python random states."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = cuda_state
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, python_gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [version, list(internal), python_gauss]}
    return tensors, meta


def rng_from_safe(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in tensors]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, python_gauss = meta["python"]
    random.setstate((version, tuple(internal), python_gauss))


class Checkpoints:
    """One latest checkpoint folder beside the output (``OUT.checkpoint``), replaced atomically."""

    def __init__(self, out: Path) -> None:
        self.folder = out.parent / f"{out.name}.checkpoint"

    def exists(self) -> bool:
        return (self.folder / STATE_FILE).is_file()

    def read_state(self) -> dict:
        try:
            return json.loads((self.folder / STATE_FILE).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LosaError(f"the checkpoint in {self.folder} is unreadable ({exc}); start over with --force") from None

    def save(
        self, accelerator, blocks: nn.ModuleList, optimizer: torch.optim.Optimizer, scheduler, state: dict
    ) -> None:
        """Every process writes its random state; the main process writes the rest, then swaps.
        ``blocks`` are the plain ones (never sharded); the optimizer's moments are gathered whole
        first when they are sharded (FSDP2, ``sharding.py``): every process takes part."""
        from safetensors.torch import save_file

        optimizer_state = full_state(optimizer.state_dict())
        staging = self.folder.parent / f".{self.folder.name}.tmp"
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        rng_tensors, rng_meta = rng_to_safe()
        save_file(
            rng_tensors, str(staging / _rng_file(accelerator.process_index)), metadata={"json": json.dumps(rng_meta)}
        )
        if accelerator.is_main_process:
            save_file(
                {k: v.detach().to("cpu").contiguous() for k, v in blocks.state_dict().items()},
                str(staging / BLOCKS_FILE),
            )
            tensors, meta = optimizer_to_safe(optimizer_state)
            save_file(tensors, str(staging / OPTIMIZER_FILE))
            (staging / TRAINER_FILE).write_text(
                json.dumps({"optimizer": meta, "scheduler": scheduler.state_dict()}) + "\n"
            )
            (staging / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            old = self.folder.parent / f".{self.folder.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            if self.folder.exists():
                self.folder.rename(old)
            staging.rename(self.folder)
            shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def load(self, accelerator, blocks: nn.ModuleList, optimizer: torch.optim.Optimizer, scheduler) -> None:
        """Restore what :meth:`save` wrote into the freshly built model, optimizer and schedule."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            blocks.load_state_dict(load_file(str(self.folder / BLOCKS_FILE)))
            trainer = json.loads((self.folder / TRAINER_FILE).read_text())
            whole = optimizer_from_safe(load_file(str(self.folder / OPTIMIZER_FILE)), trainer["optimizer"])
            optimizer.load_state_dict(shard_state(whole, optimizer))
            scheduler.load_state_dict(trainer["scheduler"])
            rng_path = str(self.folder / _rng_file(accelerator.process_index))
            with safe_open(rng_path, framework="pt") as handle:
                rng_meta = json.loads(handle.metadata()["json"])
            rng_from_safe(load_file(rng_path), rng_meta)
        except (OSError, SafetensorError, KeyError, ValueError, RuntimeError) as exc:
            raise LosaError(
                f"the checkpoint in {self.folder} is unreadable or does not fit this run ({exc}); "
                "start over with --force"
            ) from None

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
