"""Fused Triton kernels for H-LoRA, installed as ``hlora.kernels`` (never a top-level ``kernels``).

``fused_hlora_linear`` (in ``ops.py``: custom ops, autograd, public function) is what
``hlora.functional.hlora_linear`` calls for ``HLORA_BACKEND=triton`` or CUDA tensors under ``auto``;
the Triton kernels and their launchers are in ``fused_linear.py``, imported on the first call.
"""

from .ops import fused_hlora_linear, hlora_adapter_add

__all__ = ["fused_hlora_linear", "hlora_adapter_add"]
