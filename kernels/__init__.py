"""Fused Triton kernels for H-LoRA, installed as ``hlora.kernels`` (never a top-level ``kernels``).

``fused_hlora_linear`` (in ``ops.py``: custom ops, autograd, public functions) is what
``hlora.functional.hlora_linear`` calls for ``HLORA_BACKEND=triton`` or CUDA tensors under ``auto``;
``hlora_adapter_add`` adds the adapter into the output of any base layer;
``grouped_hlora_linear`` runs a mixed batch with each plugin's rank work on its own tokens. The op's reference math
is ``reference.py`` (no Triton needed), tuning choices ``tuning.py``, the Triton kernels and their
launchers ``fused_linear.py`` (imported on the first call), the ahead-of-time compile gate
``compile_gate.py``; ``README.md`` lists every launch. Nothing here imports ``hlora``.
"""

if __name__ == "hlora.kernels":
    from .ops import fused_hlora_linear, grouped_hlora_linear, hlora_adapter_add

    __all__ = ["fused_hlora_linear", "grouped_hlora_linear", "hlora_adapter_add"]
else:
    # Imported as a top-level `kernels` (the repository root on sys.path: `python -c` or `python -m pytest` in
    # the checkout). transformers and bitsandbytes probe that name for Hugging Face's kernel hub and import
    # it; define nothing, and look like what transformers treats as a folder shadowing a package (no
    # __file__, no version), so both find the hub absent instead of taking this folder and registering
    # its custom ops a second time. (An ImportError here would break `import transformers` instead.)
    __file__ = None
