"""The one medical image reader: PNG/JPEG (anything Pillow opens), DICOM and NIfTI, and the one
intensity mapping to 8 bits. Inference (``load_image``) and the dataset converters and sample set
(``read_dicom``, ``read_volume``, ``take_slice``, ``intensity_unit``, ``to_uint8``) call the same
functions, so a file and a window give the same pixels in training data and at inference.

Intensity (``intensity_unit``, then ``to_uint8``: ``rint(255 u)``):

- the window is DICOM's VOI LUT function (PS3.3 C.11.2.1.2), with centre c and width w:

  - ``LINEAR`` (the default, and the one for NIfTI, arrays and 16-bit PNGs)::

        u = clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)        (w >= 1)

  - ``LINEAR_EXACT``: ``u = clip((x - c) / w + 0.5, 0, 1)`` (w > 0);
  - ``SIGMOID``: ``u = 1 / (1 + exp(-4 (x - c) / w))`` (w > 0).

  Chosen over CT's ``level +- width/2`` because DICOM files carry ``WindowCenter``/``WindowWidth``
  defined by exactly this function, so honouring a file's window needs it; for a HU window the two
  differ by one unit at the top end only. Without a window: min-max over the image.
- DICOM: stored values go through the modality LUT (``RescaleSlope``/``RescaleIntercept``) first;
  the window is the file's (first ``WindowCenter``/``WindowWidth``, its ``VOILUTFunction``) unless one
  is given. ``MONOCHROME1`` is inverted after the window (``1 - u``). Colour data comes as RGB
  (pydicom converts YCbCr; ``PALETTE COLOR`` goes through its lookup table). Multi-frame data:
  ``frame`` (default: the middle one).
- NIfTI: the volume (``scl_slope``/``scl_inter`` applied, NaN/inf set to 0, float32) is reoriented
  to RAS+, ``slice_index`` along ``axis`` (default: the middle of axis 2, axial) is rotated 90
  degrees for display (anterior/superior up, patient's right on the image's left), then windowed
  or min-max. 4-D data: volume ``frame`` (default 0).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_color_lut, apply_modality_lut

__all__ = [
    "load_image",
    "ImageLoadError",
    "DicomImage",
    "read_dicom",
    "read_volume",
    "take_slice",
    "voi_window",
    "intensity_unit",
    "to_uint8",
    "to_pil",
]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_DICOM_SUFFIXES = (".dcm", ".dicom")
_VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


class ImageLoadError(ValueError):
    """An input image that cannot be read; the message names the file and the reason."""


# ---- intensity ---------------------------------------------------------------------------------------


def voi_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM VOI LUT function (module docstring) -> float64 in [0, 1]."""
    x = np.asarray(values, dtype=np.float64)
    c, w = float(center), float(width)
    function = function.upper()
    if function not in _VOI_FUNCTIONS:
        raise ImageLoadError(f"VOI LUT function must be one of {', '.join(_VOI_FUNCTIONS)}, got {function!r}")
    if function == "LINEAR":
        if not w >= 1:
            raise ImageLoadError(f"window width must be >= 1 for a LINEAR window, got {w}")
        if w == 1:  # a threshold: the formula's limit as w -> 1
            return (x > c - 0.5).astype(np.float64)
        return np.clip((x - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0)
    if not w > 0:
        raise ImageLoadError(f"window width must be > 0 for a {function} window, got {w}")
    if function == "LINEAR_EXACT":
        return np.clip((x - c) / w + 0.5, 0.0, 1.0)
    return 0.5 * (1.0 + np.tanh(2.0 * (x - c) / w))  # = 1 / (1 + exp(-4 (x - c) / w)), without overflow


def intensity_unit(values: np.ndarray, window: tuple | None = None, invert: bool = False,
                   function: str = "LINEAR") -> np.ndarray:
    """The one intensity mapping -> float64 in [0, 1]: ``voi_window(values, *window, function)``, or
    min-max when ``window`` is None (a constant image gives 0), then ``1 - u`` when ``invert``."""
    x = np.asarray(values, dtype=np.float64)
    if window is not None:
        unit = voi_window(x, window[0], window[1], function)
    else:
        lo, hi = (float(np.min(x)), float(np.max(x))) if x.size else (0.0, 0.0)
        unit = np.zeros_like(x) if hi <= lo else (x - lo) / (hi - lo)
    return 1.0 - unit if invert else unit


def to_uint8(unit: np.ndarray) -> np.ndarray:
    """``[0, 1]`` floats -> uint8 ``rint(255 u)`` (clipped)."""
    return np.clip(np.rint(np.asarray(unit, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def to_pil(array: np.ndarray) -> Image.Image:
    """uint8 [H, W] or [H, W, 3|4] -> RGB ``PIL.Image``."""
    if array.ndim == 2:
        return Image.fromarray(array, mode="L").convert("RGB")
    return Image.fromarray(array).convert("RGB")


# ---- DICOM -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DicomImage:
    """One frame of a DICOM file before the intensity mapping."""

    values: np.ndarray  # float64 [H, W] in modality units (CT: Hounsfield units), or uint8 [H, W, 3] RGB
    window: tuple | None  # the file's first (WindowCenter, WindowWidth), if it has one
    voi_function: str  # the file's VOILUTFunction (LINEAR when absent)
    invert: bool  # MONOCHROME1: low values display white

    @property
    def is_color(self) -> bool:
        return self.values.ndim == 3


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


def read_dicom(path: str | os.PathLike, frame: int | None = None) -> DicomImage:
    """Frame ``frame`` (default: the middle one) of a DICOM file (module docstring)."""
    path = os.fspath(path)
    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise ImageLoadError(f"{path}: DICOM file has no pixel data")
    arr = ds.pixel_array
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        index = frames // 2 if frame is None else int(frame)
        if not -frames <= index < frames:
            raise ImageLoadError(f"{path}: frame {index} is out of range for {frames} frames")
        arr = arr[index]
    elif frame not in (None, 0):
        raise ImageLoadError(f"{path}: single-frame DICOM, frame {frame} does not exist")
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        if arr.dtype != np.uint8:  # 16-bit lookup table entries -> 8 bits
            arr = to_uint8(arr / 65535.0)
        samples = 3
    c, w = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    window = (c, w) if c is not None and w is not None else None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if samples == 3:  # pydicom's pixel_array already converts YCbCr to RGB
        if arr.dtype != np.uint8:
            arr = to_uint8(intensity_unit(arr))
        return DicomImage(np.ascontiguousarray(arr), None, "LINEAR", False)
    if samples != 1:
        raise ImageLoadError(f"{path}: {samples} samples per pixel is not supported")
    values = apply_modality_lut(arr, ds).astype(np.float64)
    return DicomImage(values, window, function, photometric == "MONOCHROME1")


# ---- NIfTI -------------------------------------------------------------------------------------------


def read_volume(path: str | os.PathLike, frame: int | None = None) -> np.ndarray:
    """A NIfTI volume as float32 [X, Y, Z] in RAS+ order (scaling applied, NaN/inf -> 0).

    4-D data gives volume ``frame`` (default 0); anything but 3-D or 4-D raises ``ImageLoadError``.
    """
    path = os.fspath(path)
    img = nib.as_closest_canonical(nib.load(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4:
        index = 0 if frame is None else int(frame)
        if not -data.shape[3] <= index < data.shape[3]:
            raise ImageLoadError(f"{path}: volume {index} is out of range for {data.shape[3]} volumes")
        data = data[..., index]
    elif frame not in (None, 0):
        raise ImageLoadError(f"{path}: 3-D NIfTI, volume {frame} does not exist")
    if data.ndim != 3:
        raise ImageLoadError(f"{path}: NIfTI data of shape {data.shape} is not a 3-D or 4-D volume")
    return np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)


def take_slice(volume: np.ndarray, index: int | None = None, axis: int = 2) -> np.ndarray:
    """Slice ``index`` (default: the middle) along ``axis`` of a RAS+ volume, rotated 90 degrees for
    display; axis 2 (axial) gives rows anterior -> posterior, the patient's right on the left."""
    if axis not in (0, 1, 2):
        raise ImageLoadError(f"axis must be 0, 1 or 2, got {axis}")
    n = volume.shape[axis]
    index = n // 2 if index is None else int(index)
    if not -n <= index < n:
        raise ImageLoadError(f"slice {index} is out of range for {n} slices along axis {axis}")
    return np.ascontiguousarray(np.rot90(np.take(volume, index, axis=axis)))


# ---- any input ---------------------------------------------------------------------------------------


def _load_file(path: str, window, frame, axis, slice_index) -> Image.Image:
    if path.lower().endswith(_NIFTI_SUFFIXES):
        volume = read_volume(path, frame)
        try:
            sl = take_slice(volume, slice_index, 2 if axis is None else int(axis))
        except ImageLoadError as e:
            raise ImageLoadError(f"{path}: {e}") from None
        return to_pil(to_uint8(intensity_unit(sl, window)))
    if _is_dicom(path):
        d = read_dicom(path, frame)
        if d.is_color:
            return to_pil(d.values)
        return to_pil(to_uint8(intensity_unit(d.values, window or d.window, d.invert, d.voi_function)))
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I", "I;16", "I;16B", "F"):  # 16-bit / float greyscale PNG, TIFF
            return to_pil(to_uint8(intensity_unit(np.asarray(im), window)))
        return im.convert("RGB")


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
        window: (centre, width) overriding a DICOM file's window (with the file's VOI LUT function);
            for NIfTI and non-uint8 arrays the LINEAR window to use instead of min-max.
        frame: DICOM multi-frame frame / 4-D NIfTI volume.
        axis, slice_index: NIfTI slicing axis (0 sagittal, 1 coronal, 2 axial) and index.
    """
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        if source.ndim not in (2, 3):
            raise ImageLoadError(f"an image array must be [H, W] or [H, W, C], got shape {source.shape}")
        arr = source if source.dtype == np.uint8 and window is None else to_uint8(intensity_unit(source, window))
        return to_pil(arr)
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise ImageLoadError(f"{path}: no such file")
    try:
        return _load_file(path, window, frame, axis, slice_index)
    except ImageLoadError:
        raise
    except Exception as e:  # pydicom, nibabel and Pillow raise many types for a bad file
        raise ImageLoadError(f"{path}: cannot read as an image ({type(e).__name__}: {e})") from e
