"""Fused Triton kernels for H-LoRA, installed as ``hlora.kernels`` (never a top-level ``kernels``).

``fused_hlora_linear`` (in ``ops.py``: custom ops, autograd, public functions) is what
``hlora.functional.hlora_linear`` calls for ``HLORA_BACKEND=triton`` or CUDA tensors under ``auto``;
``hlora_adapter_add`` adds the adapter into the output of any base layer;
``grouped_hlora_linear`` runs a mixed batch with each plugin's rank work on its own tokens. The op's reference math
is ``reference.py`` (no Triton needed), tuning choices ``tuning.py``, the Triton kernels and their
launchers ``fused_linear.py`` (imported on the first call), the ahead-of-time compile gate
``compile_gate.py``; ``README.md`` lists every launch. Nothing here imports ``hlora``.
"""

from .ops import fused_hlora_linear, grouped_hlora_linear, hlora_adapter_add

__all__ = ["fused_hlora_linear", "grouped_hlora_linear", "hlora_adapter_add"]
