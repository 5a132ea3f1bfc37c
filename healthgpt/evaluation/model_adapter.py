"""The thin layer between ``healthgpt.HealthGPT`` and the runner's two callables."""

from __future__ import annotations

import inspect
import warnings

__all__ = ["build_model", "callables_from_model", "TINY_WARNING"]

TINY_WARNING = ("no --weights given: evaluating the tiny preset with random weights; "
                "the scores are meaningless (use this only to test the pipeline)")


def _device(device: str | None) -> str:
    if device in (None, "", "auto"):
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def build_model(weights: str | None = None, device: str | None = "auto", seed: int = 0):
    """``HealthGPT.from_pretrained(weights)`` (a folder written by ``save_pretrained``), or the
    tiny preset with random weights (seeded by ``seed``, with a warning)."""
    import torch
    import healthgpt
    if weights:
        model = healthgpt.HealthGPT.from_pretrained(weights)
    else:
        warnings.warn(TINY_WARNING, stacklevel=2)
        torch.manual_seed(seed)
        model = healthgpt.HealthGPT(healthgpt.HealthGPTConfig.preset("tiny"))
    return model.to(_device(device)).eval()


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def callables_from_model(model, max_new_tokens: int = 128):
    """``(answer_batch, generate_batch)`` for the runner, greedy decoding.

    Text: ``model.answer_batch(images, prompts, max_new_tokens=...)`` (or ``model.answer`` per
    sample); images: ``model.generate_images(images, instructions)`` (or ``generate_image`` per
    sample), which always decode a full 1024-code image."""
    def answer_batch(images, prompts):
        if hasattr(model, "answer_batch"):
            fn = model.answer_batch
            kw = {"max_new_tokens": max_new_tokens} if _accepts(fn, "max_new_tokens") else {}
            return list(fn(list(images), list(prompts), **kw))
        kw = {"max_new_tokens": max_new_tokens} if _accepts(model.answer, "max_new_tokens") else {}
        return [model.answer(im, p, **kw) for im, p in zip(images, prompts)]

    def generate_batch(images, instructions):
        if hasattr(model, "generate_images"):
            return list(model.generate_images(list(images), list(instructions)))
        return [model.generate_image(im, ins) for im, ins in zip(images, instructions)]

    return answer_batch, generate_batch
