"""Fused Triton kernels for H-LoRA, installed as ``hlora.kernels`` (never a top-level ``kernels``)."""
