"""Tuning off the hot path: each choice (a kernel's tile, a layer's strategy) is made once per shape
bucket and remembered in memory and on disk.

The key of a choice is (what is chosen, the GPU's name, the shape with its token count bucketed,
dtypes and flags, torch / Triton versions and a digest of the kernel source). Token counts are
bucketed to the next power of two (at least 64), so a run with random sequence lengths tunes each
site a handful of times in its life: the choice made on the first T of a bucket serves every T of
that bucket. Choices are stored in one JSON file, ``$HLORA_TUNING_CACHE`` (default
``~/.cache/hlora/tuning.json``); an unreadable or malformed file is ignored (it is only a cache)
and replaced on the next write, which goes through a temporary file and ``os.replace`` so a crash
never leaves it half written. Importable without Triton.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import tempfile
import threading
import warnings
from typing import Callable, Sequence

import torch

__all__ = ["token_bucket", "cache_path", "choose", "clear_memory"]

_MAX_FILE_BYTES = 8 * 2**20  # a cache of a few hundred choices is ~100 KB; anything larger is not ours
_KERNEL_SOURCE = pathlib.Path(__file__).with_name("fused_linear.py")

_memory: dict[tuple, str] = {}  # (what, device, shape) -> choice: the hot path's lookup
_lock = threading.Lock()


def token_bucket(n: int) -> int:
    """The bucket of a token count: the next power of two, at least 64."""
    return max(64, 1 << max(0, int(n) - 1).bit_length())


def cache_path() -> pathlib.Path:
    default = pathlib.Path.home() / ".cache" / "hlora" / "tuning.json"
    return pathlib.Path(os.environ.get("HLORA_TUNING_CACHE", default))


@functools.lru_cache(maxsize=None)
def _versions() -> str:
    import triton  # optional dependency: only the kernels' launchers call into this module

    digest = hashlib.sha256(_KERNEL_SOURCE.read_bytes()).hexdigest()[:12] if _KERNEL_SOURCE.exists() else "-"
    return f"torch={torch.__version__}|triton={triton.__version__}|kernels={digest}"


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _read(path: pathlib.Path) -> dict:
    try:
        if path.stat().st_size > _MAX_FILE_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes")
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise ValueError("not a JSON object of strings")
        return data
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        warnings.warn(f"hlora.kernels: ignoring the tuning cache {path} ({e}); it will be rewritten", stacklevel=3)
        return {}


def _write(path: pathlib.Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home must not stop training: the choice stays in memory
        warnings.warn(f"hlora.kernels: could not write the tuning cache {path} ({e})", stacklevel=3)


def key_of(what: str, device: torch.device, shape: Sequence) -> str:
    return f"{what}|{_device_name(device)}|{','.join(map(str, shape))}|{_versions()}"


def choose(what: str, device: torch.device, shape: Sequence, candidates: Sequence[str],
           measure: Callable[[str], float]) -> str:
    """The remembered choice for ``(what, device, shape)`` among ``candidates``, or, the first time,
    the one with the smallest ``measure(candidate)`` (seconds or ms), stored in memory and on disk.
    ``shape`` must already hold bucketed token counts (``token_bucket``)."""
    if len(candidates) == 1:
        return candidates[0]
    fast_key = (what, device, tuple(shape))
    choice = _memory.get(fast_key)
    if choice is not None and choice in candidates:
        return choice
    key = key_of(what, device, shape)
    with _lock:
        path = cache_path()
        stored = _read(path).get(key)
        if stored in candidates:
            _memory[fast_key] = stored
            return stored
    times = {c: measure(c) for c in candidates}
    best = min(candidates, key=lambda c: times[c])
    with _lock:
        _memory[fast_key] = best
        data = _read(path)
        data[key] = best
        _write(path, data)
    return best


def clear_memory() -> None:
    """Forget the in-memory choices (the disk cache stays): the next lookups read the file again."""
    with _lock:
        _memory.clear()
