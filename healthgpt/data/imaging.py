"""Array-level helpers the converters and the sample set share: volumes, windows, resizing.

Everything here works on numpy arrays and writes 8-bit PNGs with Pillow; nothing depends on the
model. Volumes are read with nibabel and turned to the closest canonical (RAS+) orientation, so
axis 2 is always inferior -> superior and ``axial_slice(vol, z)`` shows a slice the way a viewer
does (anterior up, patient's right on the image's left).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image
from hlora.io import atomic_write

__all__ = [
    "load_volume",
    "axial_slice",
    "window",
    "percentile_normalise",
    "to_uint8",
    "pad_to_square",
    "resize",
    "degrade",
    "save_png",
    "dicom_to_array",
]


def load_volume(path: str | os.PathLike) -> tuple:
    """A 3-D NIfTI volume as ``(float32 array in RAS+ order, voxel spacing)``.

    4-D volumes give their first frame. Raises ``ValueError`` naming the file when it is not 3-D.
    """
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    return data, tuple(float(z) for z in img.header.get_zooms()[:3])


def axial_slice(volume: np.ndarray, z: int) -> np.ndarray:
    """Slice ``z`` of a RAS+ volume, rotated for display (rows = anterior -> posterior)."""
    return np.ascontiguousarray(np.rot90(volume[:, :, z]))


def window(values: np.ndarray, level: float, width: float) -> np.ndarray:
    """CT-style window: ``[level - width/2, level + width/2]`` -> ``[0, 1]`` (clipped)."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    lo = level - width / 2.0
    return np.clip((values.astype(np.float32) - lo) / float(width), 0.0, 1.0)


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


def to_uint8(unit: np.ndarray) -> np.ndarray:
    """``[0, 1]`` floats -> uint8 (rounded)."""
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


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


def dicom_to_array(path: str | os.PathLike) -> tuple:
    """``(pixels, dataset)``: a DICOM file's first frame in its stored units (CT in Hounsfield
    units after RescaleSlope/Intercept; colour images as H x W x 3 RGB uint8: pydicom converts
    YBR to RGB itself, palette colour goes through its lookup table)."""
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    ds = pydicom.dcmread(str(path))
    arr = ds.pixel_array
    if getattr(ds, "NumberOfFrames", 1) not in (None, 1) and arr.ndim >= 3 and arr.shape[0] == int(ds.NumberOfFrames):
        arr = arr[0]
    photometric = str(getattr(ds, "PhotometricInterpretation", ""))
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 2:
        arr = apply_modality_lut(arr, ds).astype(np.float32)
        if photometric == "MONOCHROME1":
            arr = arr.max() - arr
    return arr, ds
