"""Local checkpoint directories (nothing is downloaded)."""

from __future__ import annotations

import os
import warnings

from transformers.utils import logging as hf_logging

__all__ = ["require_hf_checkpoint", "from_pretrained_checked", "require_file"]

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def require_hf_checkpoint(path: str, what: str, example: str) -> str:
    """Check that ``path`` is a local Hugging Face checkpoint directory; a clear error otherwise.

    ``what`` names the part ("LLM", "vision tower"), ``example`` the expected model.
    """
    hint = (
        f"expected a local copy of {example} (config.json and model*.safetensors), "
        f"e.g. from `huggingface-cli download {example} --local-dir DIR`"
    )
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} directory {path!r} does not exist: {hint}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{what} directory {path!r} has no config.json: {hint}")
    names = os.listdir(path)
    if not any(n in _WEIGHT_FILES or (n.startswith("model-") and n.endswith(".safetensors")) for n in names):
        raise FileNotFoundError(f"{what} directory {path!r} has no weights (one of {', '.join(_WEIGHT_FILES)}): {hint}")
    return path


def from_pretrained_checked(cls, path: str, what: str, ignore_unexpected: tuple = (), **kwargs):
    """``cls.from_pretrained(path, local_files_only=True, **kwargs)`` that refuses a checkpoint with
    missing or mis-shaped weights (transformers would initialise them at random) and reports
    unexpected ones not starting with ``ignore_unexpected`` (e.g. a full CLIP's text half)."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would list the ignored keys too
    try:
        model, info = cls.from_pretrained(path, local_files_only=True, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    bad = list(info.get("missing_keys", ())) + [str(k) for k in info.get("mismatched_keys", ())]
    if bad:
        raise ValueError(f"{what} checkpoint {path!r} lacks or mis-shapes {len(bad)} weights: {', '.join(sorted(bad)[:8])}")
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not k.startswith(tuple(ignore_unexpected)))
    if unexpected:
        warnings.warn(f"{what} checkpoint {path!r} holds {len(unexpected)} weights the model does not use: "
                      f"{', '.join(unexpected[:8])}", stacklevel=3)
    return model


def require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    return path
