"""The thin layer between ``healthgpt.HealthGPT`` and the runner's two callables (the model itself
comes from ``healthgpt.cli.model_from_args``, the one place a model is built from ``--weights``)."""

from __future__ import annotations

import inspect

__all__ = ["callables_from_model"]


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
