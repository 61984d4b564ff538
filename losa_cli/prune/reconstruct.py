"""Block-wise reconstruction, the math (torch only): which of a pruned block's parameters are tuned,
and one masked mean-squared-error step.

After a block is pruned, its kept weights are trained so that the block reproduces the dense
block's outputs on the calibration windows (arXiv 2510.14444; PERP, arXiv 2312.15230):

    minimise  mean over windows, tokens and channels of (f(x; W * M) - y_dense)^2   over the kept W,

with M the block's mask (True = kept).  A pruned weight must stay exactly zero, so its gradient
is zeroed before every Adam step -- its moments then stay zero and its update is exactly zero --
and it is written to zero again after the step (a guard that costs one pass over the weights).
Pruned biases and norms do not exist: they are trained unmasked.
"""

from __future__ import annotations

import torch
from torch import nn

#: what may be tuned: every kept linear weight with the biases and norms, or the biases and norms only (PERP)
TUNABLE = ("weights", "norms")


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and the models' own norm classes (``LlamaRMSNorm``, ``Gemma3RMSNorm``, ...)."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.lower().endswith("norm")


def tunable_parameters(block: nn.Module, which: str) -> list[tuple[nn.Parameter, torch.Tensor | None]]:
    """(parameter, keep mask or None) of what ``which`` tunes in ``block``.

    ``weights``: every ``nn.Linear`` weight, masked by its current zeros (a weight that is zero now
    stays zero), plus every linear bias and every norm's parameters; ``norms``: only the biases and
    the norms' parameters, which change no zero at all and cost nothing at inference (PERP).
    Adapter factors (LoRA) and other parameters of wrapper modules are never chosen."""
    if which not in TUNABLE:
        raise ValueError(f"which must be one of {TUNABLE}, got {which!r}")
    chosen: list[tuple[nn.Parameter, torch.Tensor | None]] = []
    seen: set[int] = set()

    def add(parameter: nn.Parameter | None, keep: torch.Tensor | None) -> None:
        if parameter is not None and id(parameter) not in seen and parameter.is_floating_point():
            seen.add(id(parameter))
            chosen.append((parameter, keep))

    for module in block.modules():
        if isinstance(module, nn.Linear):
            if which == "weights":
                add(module.weight, module.weight.detach() != 0)
            add(module.bias, None)
        elif is_norm(module):
            for parameter in module.parameters(recurse=False):
                add(parameter, None)
    return chosen


def block_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every value, in fp32."""
    return (output.float() - target.float()).pow(2).mean()


class MaskedAdam:
    """Adam on the chosen parameters, pruned entries held at exactly zero (see the module docstring)."""

    def __init__(self, chosen: list[tuple[nn.Parameter, torch.Tensor | None]], lr: float) -> None:
        self.chosen = chosen
        self.optimizer = torch.optim.Adam([parameter for parameter, _ in chosen], lr=lr)

    def step(self, loss: torch.Tensor) -> float:
        """Back-propagate ``loss`` and take one step; returns the loss.  Parameters the loss does not
        reach get no gradient and are left alone (Adam skips them)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for parameter, keep in self.chosen:
                if keep is not None and parameter.grad is not None:
                    parameter.grad.mul_(keep)
        self.optimizer.step()
        with torch.no_grad():
            for parameter, keep in self.chosen:
                if keep is not None:
                    parameter.masked_fill_(~keep, 0.0)
        return float(loss.detach())

    def reached(self) -> list[nn.Parameter]:
        """The parameters the last loss reached (those with a gradient)."""
        return [parameter for parameter, _ in self.chosen if parameter.grad is not None]
