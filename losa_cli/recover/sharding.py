"""FSDP2 for ``losa recover``: the model trains sharded across processes (``torch.distributed.fsdp.fully_shard``).

Turned on the accelerate way: ``accelerate launch --use_fsdp --fsdp_version 2 ...`` (or a config file with
``distributed_type: FSDP`` and ``fsdp_version: 2``), which sets ``ACCELERATE_USE_FSDP`` / ``FSDP_VERSION``.
losa shards the model itself instead of handing it to ``accelerator.prepare``, for two reasons:
accelerate keeps CPU runs on DDP whatever the FSDP settings say (its FSDP branch lists accelerator devices
only), and a LoSA run must change the frozen base weights between stages (pruning), which a sharded
model cannot do in place.

So a run holds two forms of the model:

* the plain model, on the host (the CPU) of every process: the stages prune it block by block (one block
  on the compute device at a time), the zero checks read it, checkpoints and the final save come from it;
* the sharded copy, trained: every block and the root are ``fully_shard``-ed, so each process holds
  1/N of the frozen sparse base weights and of the adapter factors and their optimizer moments
  on the compute device.  The masks are buffers and stay whole on every process (FSDP shards
  parameters only).

``push`` writes the plain model's base weights, masks, adapters and ranks into the shards after every
pruning stage (and after a resume); ``pull`` gathers the trained adapter factors back into the plain
model before every checkpoint and every pruning stage.  Every process calls both at the same points, as
the gathers are collective.  The optimizer's moments live only in the shards; checkpoints gather them
whole (``full_state``) and a resume cuts them again (``shard_state``), so a checkpoint looks the same
with or without FSDP.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..core.errors import ConfigError
from ..core.modeling import find_blocks
from .masked_lora import wrappers_of


def fsdp_settings(accelerator) -> dict | None:
    """``fully_shard``'s settings when the launch asked for FSDP, else None (also for one process started
    without a launcher: there is nothing to shard over).  With FSDP asked for, accelerate must never prepare
    the model itself (the stages prune it), so even one launched process takes this path.

    Refuses FSDP1: its flat parameters would hide the per-layer weights that the masks and the stages need."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
    elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":  # accelerate leaves a CPU run on DDP
        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables accelerate launch set
    else:
        return None
    if plugin.fsdp_version != 2:
        raise ConfigError("losa recover shards with FSDP2 only: launch with `--fsdp_version 2` "
                          "(or `fsdp_version: 2` in the accelerate config file)")
    if not torch.distributed.is_initialized():
        return None
    return {"reshard_after_forward": bool(plugin.reshard_after_forward), "offload_policy": plugin.cpu_offload}


def shard(model: nn.Module, device: torch.device, world: int, settings: dict) -> nn.Module:
    """``fully_shard`` every decoder block, then the root (embeddings, final norm, head), over all processes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for block in find_blocks(model):
        fully_shard(block, mesh=mesh, **settings)
    fully_shard(model, mesh=mesh, **settings)
    return model


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every process when sharded (collective), else itself (detached)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()


def like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``value`` (whole, the same on every process) cut like ``target``: this process's shard when
    ``target`` is sharded (no communication: every process cuts its own), else ``value`` on its device."""
    if isinstance(target, DTensor):
        return distribute_tensor(value.to(target.device, target.dtype), target.device_mesh, target.placements,
                                 src_data_rank=None)
    return value.to(target.device, target.dtype)


@torch.no_grad()
def assign(target: torch.Tensor, value: torch.Tensor) -> None:
    """Write the whole ``value`` into ``target``, sharded or not (each process writes its shard)."""
    if isinstance(target, DTensor):
        target.to_local().copy_(like(value, target).to_local())
    else:
        target.copy_(value)


def full_state(state: dict) -> dict:
    """``optimizer.state_dict()`` with every sharded moment gathered whole (collective: call on every process)."""
    return {**state, "state": {index: {k: full(v) if torch.is_tensor(v) else v for k, v in entry.items()}
                               for index, entry in state["state"].items()}}


def shard_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A whole optimizer state (from a checkpoint) cut like the optimizer's parameters, for ``load_state_dict``."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    cut = {}
    for index, entry in state["state"].items():
        param = params[int(index)]
        cut[index] = {k: like(v, param) if torch.is_tensor(v) and v.shape == param.shape else v
                      for k, v in entry.items()}
    return {**state, "state": cut}


@dataclass
class Sharded:
    """The plain model and its sharded training copy (see the module docstring)."""

    plain: nn.Module
    model: nn.Module

    @classmethod
    def build(cls, plain: nn.Module, device: torch.device, world: int, settings: dict) -> Sharded:
        """A sharded copy of ``plain`` (adapters attached, trainable flags set): its shards on ``device``."""
        return cls(plain, shard(copy.deepcopy(plain), device, world, settings))

    @torch.no_grad()
    def push(self) -> None:
        """Plain -> shards: base weights, adapters, masks and ranks, after a stage pruned or a resume loaded."""
        params = dict(self.model.named_parameters())
        for name, value in self.plain.named_parameters():
            assign(params[name], value.detach())
        buffers = dict(self.model.named_buffers())
        for name, value in self.plain.named_buffers():
            buffers[name].copy_(value)
        twins = wrappers_of(find_blocks(self.model))
        for name, wrapper in wrappers_of(find_blocks(self.plain)).items():
            twins[name].merged = wrapper.merged
            if hasattr(wrapper, "rank"):
                twins[name].rank = wrapper.rank

    @torch.no_grad()
    def pull(self) -> None:
        """Shards -> plain: the trained adapter factors (collective)."""
        params = dict(self.plain.named_parameters())
        for name, value in self.model.named_parameters():
            if value.requires_grad:
                params[name].copy_(full(value).to(params[name].device))
