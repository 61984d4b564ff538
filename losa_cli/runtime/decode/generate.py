"""``Decoder``: the lean decode path's public face: prefill, decode steps, generation.

    decoder = Decoder.from_model(model, blocks="int8", head="bfloat16")   # native=True by default
    out = decoder.generate(prompt_ids, max_new_tokens=64)                  # greedy
    out = decoder.generate(prompt_ids, 64, sample=True, temperature=0.8, top_p=0.9, seed=1)
    for token in decoder.stream(prompt_ids, 64):                           # the same tokens, one at a time
        ...

The prompt runs through ``LeanModel`` in one forward (packed layers take the kernel's many-row
path there), which writes its keys and values into the static KV cache; each new token then runs
through the native step (``native.py``), which reads and writes that same cache tensor, so
nothing is copied between the two.  With ``native=False`` (or for batches) the steps run through
``LeanModel`` too.  A prompt plus ``max_new_tokens`` longer than the positions the plan covers is
a one-line ``ConfigError``, never a silent truncation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ...core.errors import ConfigError
from .model import LeanModel
from .native import NativeStep
from .plan import Plan, build_plan


@dataclass
class Generation:
    """New tokens and what they cost."""

    tokens: list[int]
    prompt_tokens: int
    prefill_ms: float  # the prompt's forward and the choice of the first new token
    step_ms: list[float] = field(default_factory=list)  # each later token: one decode step and its choice
    stopped_by: str = "max_new_tokens"  # or "eos"

    @property
    def ms_per_token(self) -> float:
        """Median decode step (the prefill excluded); nan when there was none."""
        return float(torch.tensor(self.step_ms).median()) if self.step_ms else float("nan")


def choose(logits: torch.Tensor, sample: bool, temperature: float, top_p: float,
           generator: torch.Generator | None) -> int:
    """The next token from logits [vocab]: the argmax, or a draw from softmax(logits / temperature)
    limited to the most likely tokens whose mass reaches ``top_p`` (the first always stays)."""
    if not sample:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


#: positions by which the KV cache grows (``Decoder.reserve``)
CACHE_STEP = 256


class Decoder:
    """A model's lean decode path: ``LeanModel`` for the prompt, the native step per token."""

    def __init__(self, plan: Plan, native: bool = True, path: str | None = None,
                 eos: tuple[int, ...] = ()) -> None:
        self.plan, self.eos = plan, eos
        self.model = LeanModel(plan, path).eval()
        self.native = NativeStep(plan, path) if native else None
        if self.native is not None:
            self.native.bind_cache(self.model.k_cache, self.model.v_cache)

    @classmethod
    def from_model(cls, model: nn.Module, blocks: str | None = None, head: str | None = None, native: bool = True,
                   max_len: int | None = None, path: str | None = None) -> Decoder:
        """The decode path of a loaded transformers causal LM (see ``plan.build_plan`` for ``blocks``,
        ``head`` and ``max_len``; ``path``: the kernel path of packed layers, default the best here)."""
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = model.config.eos_token_id if eos is None else eos
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(build_plan(model, blocks, head, max_len), native, path, eos_ids)

    def reserve(self, length: int, batch: int = 1) -> None:
        """Make the KV cache hold ``batch`` sequences of ``length`` positions: grown (never shrunk) in
        steps of ``CACHE_STEP`` positions, so a caller stepping past it reallocates rarely."""
        model = self.model
        if length > self.plan.max_len:
            raise ConfigError(_too_long(length, self.plan))
        if length > model.capacity or batch > model.k_cache.shape[1]:
            capacity = min(self.plan.max_len, -(-max(length, model.capacity) // CACHE_STEP) * CACHE_STEP)
            model.setup_cache(max(batch, model.k_cache.shape[1]), capacity)
            if self.native is not None:
                self.native.bind_cache(model.k_cache, model.v_cache)

    @torch.inference_mode()
    def prefill(self, token_ids: torch.Tensor, start_position: int = 0) -> torch.Tensor:
        """Run ``token_ids`` [batch, positions] from ``start_position`` through LeanModel, filling the
        cache; returns the logits [batch, vocab] of the last position."""
        self.reserve(start_position + token_ids.shape[1], token_ids.shape[0])
        return self.model(token_ids, start_position, last_only=True)[:, -1]

    def step(self, token: int, position: int) -> torch.Tensor:
        """Logits [vocab] of one token at ``position`` (batch 1), after the positions before it are cached.
        The native step returns its own buffer, overwritten by the next step: copy what you keep."""
        if position >= self.model.capacity:
            self.reserve(position + 1)
        if self.native is not None:
            return self.native.step(token, position)  # no autograd to switch off: it runs in C++
        with torch.inference_mode():
            return self.model(torch.tensor([[token]]), position, last_only=True)[0, -1]

    def generate(self, prompt_ids: torch.Tensor | list[int], max_new_tokens: int, sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                 eos: tuple[int, ...] | None = None) -> Generation:
        """Continue one prompt by up to ``max_new_tokens`` tokens, stopping after an EOS token
        (default: the model's); sampling draws from a ``torch.Generator`` seeded with ``seed``."""
        tokens = self.stream(prompt_ids, max_new_tokens, sample, temperature, top_p, seed, eos)
        started = time.perf_counter()
        result = Generation([next(tokens)], torch.as_tensor(prompt_ids).numel(), (time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        for token in tokens:
            now = time.perf_counter()
            result.step_ms.append((now - started) * 1000)
            result.tokens.append(token)
            started = now
        if result.tokens[-1] in set(self.eos if eos is None else eos):
            result.stopped_by = "eos"
        return result

    def stream(self, prompt_ids: torch.Tensor | list[int], max_new_tokens: int, sample: bool = False,
               temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
               eos: tuple[int, ...] | None = None) -> Iterator[int]:
        """``generate``'s tokens one at a time, each as soon as it is chosen (a server streams them, and stops
        a generation whose client left by no longer asking).  The prompt and lengths are checked here, before
        the first token is asked for; the model's state belongs to the stream until it ends or is closed."""
        ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(1, -1)
        if ids.shape[1] == 0 or max_new_tokens < 1:
            raise ConfigError("generate needs a non-empty prompt and max_new_tokens of at least 1")
        total = ids.shape[1] + max_new_tokens
        if total > self.plan.max_len:
            raise ConfigError(_too_long(total, self.plan, ids.shape[1], max_new_tokens))
        return self._tokens(ids, total, set(self.eos if eos is None else eos),
                            torch.Generator().manual_seed(seed) if sample else None, temperature, top_p)

    def _tokens(self, ids: torch.Tensor, total: int, stop: set[int], generator: torch.Generator | None,
                temperature: float, top_p: float) -> Iterator[int]:
        """The prefill's token, then one decode step per token until an EOS token or ``total`` positions."""
        self.reserve(total)
        sample = generator is not None
        token = choose(self.prefill(ids)[0], sample, temperature, top_p, generator)
        yield token
        for position in range(ids.shape[1], total - 1):
            if token in stop:
                return
            token = choose(self.step(token, position), sample, temperature, top_p, generator)
            yield token

    def weight_bytes_per_token(self) -> dict[str, int]:
        """Bytes of weights one batch-1 decode step reads (``Plan.weight_bytes_per_token``)."""
        return self.plan.weight_bytes_per_token()

    def kv_bytes(self, past: int) -> int:
        """Bytes of keys and values one decode step reads after ``past`` positions (sliding windows counted)."""
        f = self.plan.family
        seen = sum(min(past + 1, w) if w else past + 1 for w in f.windows)
        return 2 * seen * f.kv_heads * f.head_dim * 4


def _too_long(total: int, plan: Plan, prompt: int | None = None, new: int | None = None) -> str:
    what = f"a prompt of {prompt} tokens + max_new_tokens {new} = {total} positions" if prompt else f"{total} positions"
    limit = plan.max_len
    whose = "the model's context" if limit == plan.family.max_positions else "the positions this decoder was built for"
    return f"{what} exceed {whose} of {limit}; shorten the prompt or lower max_new_tokens"
