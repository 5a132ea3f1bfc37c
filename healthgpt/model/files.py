"""Local checkpoint directories (nothing is downloaded)."""

from __future__ import annotations

import json
import os
import warnings

from safetensors import SafetensorError, safe_open
from transformers.utils import logging as hf_logging

from hlora import CheckpointError

__all__ = ["require_hf_checkpoint", "from_pretrained_checked", "require_file", "read_json", "check_model_files"]

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


def read_json(path: str, what: str):
    """The JSON value in ``path``; an empty or invalid file raises ``CheckpointError`` naming the
    file and, for a syntax error, its line and column."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{what} {path} is not UTF-8 text: {e}") from None
    if not text.strip():
        raise CheckpointError(f"{what} {path} is empty (an interrupted copy or save?)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None


def check_model_files(root: str, what: str) -> None:
    """Read-check every file under ``root`` before a model is built from it: no empty file, every
    ``.json`` parses, every ``.safetensors`` header is whole (``hlora.io.read_safetensors`` reads
    the values later). One ``CheckpointError`` naming the first bad file."""
    paths = [root] if os.path.isfile(root) else sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names)
    for path in paths:
        if os.path.getsize(path) == 0:
            raise CheckpointError(f"{what} file {path} is empty (an interrupted copy or save?)")
        if path.endswith(".json"):
            read_json(path, f"{what} file")
        elif path.endswith(".safetensors"):
            try:
                with safe_open(path, framework="pt") as f:
                    f.keys()
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"{what} file {path} is not a readable safetensors file (truncated or "
                                      f"corrupt?): {e}") from None
