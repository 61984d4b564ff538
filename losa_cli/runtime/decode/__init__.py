"""The lean decode path: losa's own forward over a loaded model's weights (house plan, practice 13).

``plan.py`` reads the model (config -> ``Family``; fused q/k/v and gate/up weights, dense or packed;
RoPE tables from the model's own rotary module), ``model.py`` is the readable PyTorch decoder with a
static KV cache (the prefill path, and the reference), ``native.py`` wraps the native per-token step
(``kernels/decode.cpp``), ``generate.py`` puts them together behind ``Decoder``.
"""

from .generate import Decoder, Generation, choose
from .model import LeanModel
from .native import NativeStep
from .plan import SUPPORTED, Family, Plan, build_plan, read_family

__all__ = ["Decoder", "Family", "Generation", "LeanModel", "NativeStep", "Plan", "SUPPORTED", "build_plan", "choose",
           "read_family"]
