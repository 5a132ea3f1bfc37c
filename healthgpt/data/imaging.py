"""Array helpers the converters and the sample set share after reading: MR intensity scaling,
squaring, resizing, the super-resolution degradation, and writing 8-bit PNGs.

Reading files and the intensity window are ``healthgpt.data.images`` (``read_volume``,
``read_dicom``, ``take_slice``, ``intensity_unit``, ``to_uint8``), the same functions inference
uses, so a converted PNG holds the pixels ``load_image`` gives for the same file and window.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image
from hlora.files import atomic_write

__all__ = ["percentile_normalise", "pad_to_square", "resize", "square_unit", "degrade", "save_png"]


def percentile_normalise(values: np.ndarray, lo: float = 0.5, hi: float = 99.5, mask: np.ndarray | None = None) -> np.ndarray:
    """MR-style intensity scaling: the ``lo``/``hi`` percentiles (inside ``mask`` if given) -> 0/1."""
    v = values.astype(np.float32)
    ref = v[mask > 0] if mask is not None and np.any(mask > 0) else v
    if ref.size == 0:
        return np.zeros_like(v)
    a, b = np.percentile(ref, [lo, hi])
    if b <= a:
        return np.zeros_like(v) if b == 0 else np.clip(v / max(b, 1e-6), 0.0, 1.0)
    return np.clip((v - a) / (b - a), 0.0, 1.0)


def pad_to_square(img: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Centre ``img`` (H x W or H x W x C) on a square canvas of side max(H, W)."""
    h, w = img.shape[:2]
    side = max(h, w)
    if h == w:
        return img
    out = np.full((side, side, *img.shape[2:]), fill, dtype=img.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = img
    return out


_METHODS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
            "area": Image.BOX, "lanczos": Image.LANCZOS}


def resize(img: np.ndarray, size: int | tuple, method: str = "bicubic") -> np.ndarray:
    """Resize a 2-D float/uint8 array or an H x W x 3 uint8 image to ``size`` ((h, w) or a side).

    Float arrays keep float32 (Pillow mode ``F``); ``area`` averages whole source pixels (the
    anti-aliased downsampling the super-resolution inputs are made with).
    """
    h, w = (size, size) if isinstance(size, int) else size
    if method not in _METHODS:
        raise ValueError(f"unknown resize method {method!r}; choose one of {sorted(_METHODS)}")
    if img.dtype == np.uint8:
        return np.asarray(Image.fromarray(img).resize((w, h), _METHODS[method]))
    if img.ndim != 2:
        raise ValueError("float images must be 2-D (one channel)")
    return np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize((w, h), _METHODS[method]))


def square_unit(unit: np.ndarray, size: int) -> np.ndarray:
    """A ``[0, 1]`` grey image zero-padded to a square, bicubic-resized to ``size`` x ``size``
    (float32; left untouched when already that size) and clipped to ``[0, 1]``."""
    img = pad_to_square(unit)
    if img.shape[:2] != (size, size):
        img = resize(img.astype(np.float32), size, "bicubic")
    return img.clip(0.0, 1.0)


def degrade(img: np.ndarray, factor: int, keep_size: bool = True) -> np.ndarray:
    """The low-resolution input of a super-resolution pair: area-downsample by ``factor`` (the
    anti-aliased average of each factor x factor block), then, if ``keep_size``, bicubic-upsample
    back to the original size (the usual SR setting where input and target share a grid)."""
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"downsampling factor must be a positive integer, got {factor}")
    h, w = img.shape[:2]
    small = resize(img, (max(1, h // factor), max(1, w // factor)), "area")
    return resize(small, (h, w), "bicubic") if keep_size else small


def save_png(img: np.ndarray, path: str | os.PathLike) -> str:
    """Write a uint8 image (2-D grey or H x W x 3) as PNG, atomically (temp file + rename)."""
    path = str(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if img.dtype != np.uint8:
        raise TypeError(f"save_png needs uint8 pixels, got {img.dtype}")
    atomic_write(path, lambda tmp: Image.fromarray(img).save(tmp, format="PNG"))
    return path
