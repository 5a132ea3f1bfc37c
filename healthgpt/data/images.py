"""Reading medical images into 8-bit RGB ``PIL.Image``s: PNG/JPEG (anything Pillow opens), DICOM, NIfTI.

Intensity to 8 bits:

- DICOM: stored values go through the modality LUT (``RescaleSlope``/``RescaleIntercept``), then the
  DICOM linear VOI window (PS3.3 C.11.2.1.2) with centre c and width w, from the file's
  ``WindowCenter``/``WindowWidth`` (first value) or the ``window`` argument::

      y = clip(((x - (c - 0.5)) / (w - 1) + 0.5) * 255, 0, 255)

  without a window: min-max over the frame. ``MONOCHROME1`` is inverted; colour data comes as RGB
  (pydicom converts YCbCr). Multi-frame data: ``frame`` (default: the middle one).
- NIfTI: the volume is reoriented to RAS+, ``slice_index`` along ``axis`` (default: the middle of
  axis 2, axial) is rotated 90 degrees for display (anterior/superior up), then the ``window`` or
  min-max. 4-D data: volume ``frame`` (default 0).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

__all__ = ["load_image", "ImageLoadError", "to_pil"]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_DICOM_SUFFIXES = (".dcm", ".dicom")


class ImageLoadError(ValueError):
    """An input image that cannot be read; the message names the file and the reason."""


def _window(x: np.ndarray, window) -> np.ndarray:
    """float array -> uint8 through the linear window (c, w), or min-max when ``window`` is None."""
    x = x.astype(np.float64)
    if window is None:
        lo, hi = float(np.min(x)), float(np.max(x))
        y = np.zeros_like(x) if hi <= lo else (x - lo) / (hi - lo) * 255.0
    else:
        c, w = float(window[0]), float(window[1])
        if w < 1:
            raise ImageLoadError(f"window width must be >= 1, got {w}")
        y = ((x - (c - 0.5)) / max(w - 1.0, 1e-12) + 0.5) * 255.0
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def to_pil(array: np.ndarray) -> Image.Image:
    """uint8 [H, W] or [H, W, 3|4] -> RGB ``PIL.Image``."""
    if array.ndim == 2:
        return Image.fromarray(array, mode="L").convert("RGB")
    return Image.fromarray(array).convert("RGB")


def _first(value):
    if value is None:
        return None
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _is_dicom(path: str) -> bool:
    if path.lower().endswith(_DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _load_dicom(path: str, window, frame) -> Image.Image:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise ImageLoadError(f"{path}: DICOM file has no pixel data")
    arr = ds.pixel_array
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if frames > 1:
        index = frames // 2 if frame is None else int(frame)
        if not -frames <= index < frames:
            raise ImageLoadError(f"{path}: frame {index} is out of range for {frames} frames")
        arr = arr[index]
    elif frame not in (None, 0):
        raise ImageLoadError(f"{path}: single-frame DICOM, frame {frame} does not exist")
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if samples == 3:  # pydicom's pixel_array already converts YCbCr to RGB
        if arr.dtype != np.uint8:
            arr = _window(arr, window)
        return to_pil(np.ascontiguousarray(arr))
    if samples != 1:
        raise ImageLoadError(f"{path}: {samples} samples per pixel is not supported")
    values = apply_modality_lut(arr, ds).astype(np.float64)
    if window is None:
        c, w = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
        window = (c, w) if c is not None and w is not None else None
    out = _window(values, window)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return to_pil(out)


def _load_nifti(path: str, window, axis, slice_index, frame) -> Image.Image:
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(path))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4:
        index = 0 if frame is None else int(frame)
        if not -data.shape[3] <= index < data.shape[3]:
            raise ImageLoadError(f"{path}: volume {index} is out of range for {data.shape[3]} volumes")
        data = data[..., index]
    elif frame not in (None, 0):
        raise ImageLoadError(f"{path}: 3-D NIfTI, volume {frame} does not exist")
    if data.ndim != 3:
        raise ImageLoadError(f"{path}: NIfTI data of shape {data.shape} is not a 3-D or 4-D volume")
    axis = 2 if axis is None else int(axis)
    if axis not in (0, 1, 2):
        raise ImageLoadError(f"{path}: axis must be 0, 1 or 2, got {axis}")
    n = data.shape[axis]
    index = n // 2 if slice_index is None else int(slice_index)
    if not -n <= index < n:
        raise ImageLoadError(f"{path}: slice {index} is out of range for {n} slices along axis {axis}")
    sl = np.take(data, index, axis=axis).astype(np.float64)  # dataobj applies scl_slope / scl_inter
    return to_pil(_window(np.rot90(sl), window))


def load_image(
    source,
    *,
    window: tuple | None = None,
    frame: int | None = None,
    axis: int | None = None,
    slice_index: int | None = None,
) -> Image.Image:
    """A medical image as an 8-bit RGB ``PIL.Image`` (module docstring has the intensity mapping).

    Args:
        source: a path (PNG/JPEG/... , ``.dcm`` or any file with the DICM preamble, ``.nii``/``.nii.gz``),
            a ``PIL.Image``, or a numpy array (uint8 as is; other dtypes through ``window``/min-max).
        window: (centre, width) overriding a DICOM file's window; for NIfTI and non-uint8 arrays
            the window to use instead of min-max.
        frame: DICOM multi-frame frame / 4-D NIfTI volume.
        axis, slice_index: NIfTI slicing axis (0 sagittal, 1 coronal, 2 axial) and index.
    """
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        arr = source if source.dtype == np.uint8 and window is None else _window(source, window)
        if arr.ndim not in (2, 3):
            raise ImageLoadError(f"an image array must be [H, W] or [H, W, C], got shape {source.shape}")
        return to_pil(arr)
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise ImageLoadError(f"{path}: no such file")
    lower = path.lower()
    try:
        if lower.endswith(_NIFTI_SUFFIXES):
            return _load_nifti(path, window, axis, slice_index, frame)
        if _is_dicom(path):
            return _load_dicom(path, window, frame)
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I", "I;16", "I;16B", "F"):  # 16-bit / float greyscale PNG, TIFF
                return to_pil(_window(np.asarray(im), window))
            return im.convert("RGB")
    except ImageLoadError:
        raise
    except Exception as e:  # pydicom, nibabel and Pillow raise many types for a bad file
        raise ImageLoadError(f"{path}: cannot read as an image ({type(e).__name__}: {e})") from e
