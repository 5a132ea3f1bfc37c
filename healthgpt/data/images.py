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
- DICOM: stored values go through the modality LUT (``RescaleSlope``/``RescaleIntercept``, or a
  Modality LUT Sequence) first; the window is the one given, else the file's (first
  ``WindowCenter``/``WindowWidth``, its ``VOILUTFunction``), else the file's first VOI LUT Sequence
  item (PS3.3 C.11.2.1.1: ``u = LUT[clip(x - first_mapped, 0, entries - 1)] / (2**bits - 1)``), else
  min-max. Enhanced multi-frame files (PS3.3 C.7.6.16) take the rescale and window of the shown frame
  from its Per-Frame Functional Group (else the Shared one). ``MONOCHROME1`` is inverted after the
  window (``1 - u``). Colour data comes as RGB
  (pydicom converts YCbCr; ``PALETTE COLOR`` goes through its lookup table). Multi-frame data:
  ``frame`` (default: the middle one). Files without the Part-10 preamble/meta (legacy ACR-NEMA
  style) are read too (``force``; the transfer syntax is the one pydicom detects).
- NIfTI: the volume (``scl_slope``/``scl_inter`` applied, float32) is reoriented to RAS+,
  ``slice_index`` along ``axis`` (default: the middle of axis 2, axial) is rotated 90 degrees for
  display (anterior/superior up, patient's right on the image's left), then windowed or min-max.
  4-D data: volume ``frame`` (default 0). Non-finite voxels are replaced by the finite range's ends
  (NaN and -inf by the lowest finite value, +inf by the highest; 0 when none is finite) so min-max
  runs on finite values, and a ``NonFiniteVoxelsWarning`` says how many.

Resources (user files are untrusted): only what is shown is decoded. ``load_image`` reads one NIfTI
slice through nibabel's array proxy (a 1024^3 volume costs one 1024^2 slice) and one DICOM frame;
before decoding, the declared size of that 2-D image (PNG/JPEG width x height, DICOM Rows x Columns,
the NIfTI slice plane) is checked against ``max_pixels`` (argument, else the environment variable
``HEALTHGPT_MAX_PIXELS``, else ``DEFAULT_MAX_PIXELS``), and a deflated DICOM, which must be inflated
whole to reach any frame, has all its frames counted. Over the limit: ``ImageLoadError`` naming the
file, the declared size and the limit.
"""

from __future__ import annotations

import io
import os
import warnings
import zlib
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.filereader import read_dataset, read_preamble
from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

__all__ = [
    "load_image",
    "ImageLoadError",
    "NonFiniteVoxelsWarning",
    "DEFAULT_MAX_PIXELS",
    "max_pixels_limit",
    "DicomImage",
    "read_dicom",
    "read_volume",
    "take_slice",
    "read_slice",
    "voi_window",
    "intensity_unit",
    "to_uint8",
    "to_pil",
]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_DICOM_SUFFIXES = (".dcm", ".dicom")
_VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


DEFAULT_MAX_PIXELS = 50_000_000  # ~7000^2: far above any radiology image, far below a decompression bomb
_MAX_PIXELS_ENV = "HEALTHGPT_MAX_PIXELS"


class ImageLoadError(ValueError):
    """An input image that cannot be read; the message names the file and the reason."""


class NonFiniteVoxelsWarning(UserWarning):
    """NaN/inf voxels were replaced before the intensity mapping; the message says how many."""


def max_pixels_limit(max_pixels: int | None = None) -> int:
    """The pixel limit in force: ``max_pixels``, else ``$HEALTHGPT_MAX_PIXELS``, else the default."""
    if max_pixels is None:
        text = os.environ.get(_MAX_PIXELS_ENV)
        if text is None:
            return DEFAULT_MAX_PIXELS
        try:
            max_pixels = int(text)
        except ValueError:
            raise ImageLoadError(f"{_MAX_PIXELS_ENV} must be a whole number of pixels, got {text!r}") from None
    if int(max_pixels) < 1:
        raise ImageLoadError(f"the pixel limit must be >= 1, got {max_pixels}")
    return int(max_pixels)


def _check_size(path: str, what: str, shape: tuple, max_pixels: int, hint: str = "") -> None:
    pixels = int(np.prod([int(n) for n in shape], dtype=object))
    if pixels > max_pixels:
        raise ImageLoadError(
            f"{path}: {what} declares {' x '.join(str(int(n)) for n in shape)} = {pixels:,} pixels, over the "
            f"limit of {max_pixels:,}{hint} (raise it with max_pixels= or ${_MAX_PIXELS_ENV} if the file is trusted)")


def _finite(values: np.ndarray, path: str) -> np.ndarray:
    """Non-finite values -> the ends of the finite range (module docstring), with a warning."""
    bad = ~np.isfinite(values)
    count = int(np.count_nonzero(bad))
    if not count:
        return values
    good = values[~bad]
    lo, hi = (float(good.min()), float(good.max())) if good.size else (0.0, 0.0)
    out = np.where(np.isposinf(values), hi, values)
    out[bad & ~np.isposinf(values)] = lo
    warnings.warn(f"{path}: {count} non-finite voxel(s) (NaN/inf) of {values.size} replaced "
                  f"(NaN and -inf by {lo:g}, +inf by {hi:g}) before the intensity mapping",
                  NonFiniteVoxelsWarning, stacklevel=3)
    return out.astype(values.dtype, copy=False)


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
    window: tuple | None  # the frame's first (WindowCenter, WindowWidth), if it has one
    voi_function: str  # the frame's VOILUTFunction (LINEAR when absent)
    invert: bool  # MONOCHROME1: low values display white
    voi_lut_unit: np.ndarray | None = None  # values through the file's VOI LUT Sequence, in [0, 1]

    @property
    def is_color(self) -> bool:
        return self.values.ndim == 3

    def unit(self, window: tuple | None = None) -> np.ndarray:
        """Greyscale frame -> float64 [0, 1] (module docstring): ``window`` if given, else the file's
        window, else its VOI LUT Sequence, else min-max; MONOCHROME1 inverted."""
        if window is None and self.window is None and self.voi_lut_unit is not None:
            return 1.0 - self.voi_lut_unit if self.invert else self.voi_lut_unit
        return intensity_unit(self.values, window or self.window, self.invert, self.voi_function)


def _first(value):
    if value is None:
        return None
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _frame_group(ds: pydicom.Dataset, index: int | None, name: str) -> pydicom.Dataset:
    """Where frame ``index``'s ``name`` macro lives in an enhanced multi-frame file (PS3.3 C.7.6.16):
    the frame's Per-Frame Functional Group item, else the Shared one, else the dataset itself."""
    for groups, i in (("PerFrameFunctionalGroupsSequence", index or 0), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq is not None and i < len(seq) and name in seq[i] and len(seq[i][name].value):
            return seq[i][name].value[0]
    return ds


def _voi_lut_unit(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray | None:
    """``values`` through the file's first VOI LUT Sequence item (PS3.3 C.11.2.1.1), scaled by the LUT's
    bit depth to [0, 1]. Not pydicom's ``apply_voi``: it indexes in the LUT's own dtype, so with an
    8-bit LUT an input more than 255 above the first mapped value wraps around instead of clipping."""
    seq = ds.get("VOILUTSequence")
    if not seq or "LUTDescriptor" not in seq[0] or "LUTData" not in seq[0]:
        return None
    entries, first, bits = (int(v) for v in seq[0].LUTDescriptor)
    entries = entries or 65536  # C.11.1.1.1: 0 means 2**16 entries
    if not 1 <= bits <= 16:
        raise ImageLoadError(f"VOI LUT Descriptor declares {bits} bits per entry (1 to 16 allowed)")
    data = seq[0].LUTData
    if isinstance(data, bytes):  # OW: 16-bit words in the file's byte order
        little = ds.original_encoding[1] is not False
        data = np.frombuffer(data, dtype="<u2" if little else ">u2")
    lut = np.asarray(data, dtype=np.float64).reshape(-1)
    if lut.size < entries:
        raise ImageLoadError(f"VOI LUT Descriptor declares {entries} entries but the LUT Data holds {lut.size}")
    index = np.clip(np.rint(values) - first, 0, entries - 1).astype(np.int64)
    return lut[index] / (2**bits - 1)


def _is_dicom(path: str) -> bool:
    if path.lower().endswith(_DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


_DEFLATED_HEAD_BYTES = 1 << 20  # inflated bytes enough for any header before the pixel data
_PIXEL_DATA = 0x7FE00010
_DEFER_BYTES = 1 << 16
_SYNTAX_OF_ENCODING = {(True, True): ImplicitVRLittleEndian, (False, True): ExplicitVRLittleEndian,
                       (False, False): ExplicitVRBigEndian}


def _deflated_header(path: str, meta) -> pydicom.Dataset | None:
    """The elements before the pixel data of a deflated file, inflating at most 1 MiB (pydicom's
    reader inflates the whole file first, so its declared size is checked on this instead)."""
    with open(path, "rb") as f:
        read_preamble(f, force=True)
        f.seek(f.tell() + 12 + int(meta.get("FileMetaInformationGroupLength", 0)))  # group length element + group
        head = zlib.decompressobj(-zlib.MAX_WBITS).decompress(f.read(_DEFLATED_HEAD_BYTES), _DEFLATED_HEAD_BYTES)
    try:
        return read_dataset(io.BytesIO(head), False, True, stop_when=lambda tag, vr, length: tag == _PIXEL_DATA)
    except Exception:  # a header longer than the inflated head: pydicom's own read reports what is wrong
        return None


def read_dicom(path: str | os.PathLike, frame: int | None = None, max_pixels: int | None = None) -> DicomImage:
    """Frame ``frame`` (default: the middle one) of a DICOM file (module docstring): the header is
    read first, its Rows x Columns checked against ``max_pixels``, then only that frame decoded."""
    path = os.fspath(path)
    limit = max_pixels_limit(max_pixels)
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:  # no Part-10 meta (legacy files): the dataset is read with force below
        meta = pydicom.Dataset()
    deflated = meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    if deflated:
        head = _deflated_header(path, meta)
        if head is not None:
            shape = (int(head.get("NumberOfFrames", 1) or 1), int(head.get("Rows", 0) or 0), int(head.get("Columns", 0) or 0))
            _check_size(path, "the deflated DICOM (inflated whole to reach any frame)", shape, limit)
        ds = pydicom.dcmread(path)
    else:
        ds = pydicom.dcmread(path, force=True, defer_size=_DEFER_BYTES)  # large values stay on disk
    if "PixelData" not in ds:
        raise ImageLoadError(f"{path}: DICOM file has no pixel data")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    _check_size(path, "the DICOM frame", (rows, cols), limit)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        index = frames // 2 if frame is None else int(frame)
        if not -frames <= index < frames:
            raise ImageLoadError(f"{path}: frame {index} is out of range for {frames} frames")
        index %= frames
    elif frame not in (None, 0):
        raise ImageLoadError(f"{path}: single-frame DICOM, frame {frame} does not exist")
    else:
        index = None
    if deflated:
        arr = pixel_array(ds, index=index)
    else:
        syntax = ds.file_meta.get("TransferSyntaxUID") or _SYNTAX_OF_ENCODING[ds.original_encoding]
        arr = pixel_array(path, index=index, transfer_syntax_uid=syntax)  # reads that one frame only
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        if arr.dtype != np.uint8:  # 16-bit lookup table entries -> 8 bits
            arr = to_uint8(arr / 65535.0)
        samples = 3
    voi = _frame_group(ds, index, "FrameVOILUTSequence")
    c, w = _first(voi.get("WindowCenter")), _first(voi.get("WindowWidth"))
    window = (c, w) if c is not None and w is not None else None
    function = str(voi.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if samples == 3:  # pydicom's pixel_array already converts YCbCr to RGB
        if arr.dtype != np.uint8:
            arr = to_uint8(intensity_unit(arr))
        return DicomImage(np.ascontiguousarray(arr), None, "LINEAR", False)
    if samples != 1:
        raise ImageLoadError(f"{path}: {samples} samples per pixel is not supported")
    rescale = _frame_group(ds, index, "PixelValueTransformationSequence")
    values = apply_modality_lut(arr, ds if rescale is ds or "ModalityLUTSequence" in ds else rescale).astype(np.float64)
    lut = None if window is not None else _voi_lut_unit(values, ds)
    return DicomImage(values, window, function, photometric == "MONOCHROME1", lut)


# ---- NIfTI -------------------------------------------------------------------------------------------


def read_volume(path: str | os.PathLike, frame: int | None = None) -> np.ndarray:
    """A whole NIfTI volume as float32 [X, Y, Z] in RAS+ order (scaling applied, non-finite voxels
    replaced with a warning: module docstring). For the converters, which use every slice; showing
    one slice is ``read_slice``, which reads only that slice.

    4-D data gives volume ``frame`` (default 0); anything but 3-D or 4-D raises ``ImageLoadError``.
    """
    path = os.fspath(path)
    img = nib.load(path)
    shape = img.shape
    if len(shape) == 4:
        index = _volume_index(path, shape, frame)
        data = img.dataobj[..., index]
    elif len(shape) == 3:
        _volume_index(path, shape, frame)
        data = img.dataobj
    else:
        raise ImageLoadError(f"{path}: NIfTI data of shape {shape} is not a 3-D or 4-D volume")
    ornt = nib.io_orientation(img.affine)
    data = nib.orientations.apply_orientation(np.asarray(data, dtype=np.float32), ornt)
    return _finite(np.ascontiguousarray(data), path)


def _volume_index(path: str, shape: tuple, frame: int | None) -> int | None:
    if len(shape) == 3:
        if frame not in (None, 0):
            raise ImageLoadError(f"{path}: 3-D NIfTI, volume {frame} does not exist")
        return None
    index = 0 if frame is None else int(frame)
    if not -shape[3] <= index < shape[3]:
        raise ImageLoadError(f"{path}: volume {index} is out of range for {shape[3]} volumes")
    return index % shape[3]


_SLAB_BYTES = 32 << 20


def _read_plane(proxy, slicer: tuple, voxel_axis: int, shape: tuple) -> np.ndarray:
    """``proxy[slicer]`` as float32. A plane across voxel axis 2 (stored last) is contiguous and read
    directly; any other plane is strided over the whole file, and nibabel reads a strided slice of a
    gzipped file point by point (minutes for a large volume), so it is cut from contiguous slabs
    ``[:, :, z0:z1]`` of at most ``_SLAB_BYTES`` (counted as float64, nibabel's scaled type)."""
    if voxel_axis == 2:
        return np.asarray(proxy[slicer], dtype=np.float32)
    step = max(1, _SLAB_BYTES // (int(shape[0]) * int(shape[1]) * 8))
    out = np.empty([shape[i] for i in range(3) if i != voxel_axis], dtype=np.float32)
    for z0 in range(0, shape[2], step):
        z1 = min(z0 + step, shape[2])
        slab = list(slicer)
        slab[voxel_axis], slab[2] = slice(None), slice(z0, z1)
        out[:, z0:z1] = np.take(np.asarray(proxy[tuple(slab)]), slicer[voxel_axis], axis=voxel_axis)
    return out


def read_slice(path: str | os.PathLike, index: int | None = None, axis: int = 2, frame: int | None = None,
               max_pixels: int | None = None) -> np.ndarray:
    """``take_slice(read_volume(path, frame), index, axis)`` (float32, display orientation), reading
    only that slice from the file through nibabel's array proxy; the slice plane's declared size is
    checked against ``max_pixels`` first."""
    path = os.fspath(path)
    img = nib.load(path, keep_file_open=True)  # header only; the data stay on disk behind img.dataobj
    # (kept open: a gzip stream then seeks on from where the last slab ended instead of from the start)
    shape = img.shape
    if len(shape) not in (3, 4):
        raise ImageLoadError(f"{path}: NIfTI data of shape {shape} is not a 3-D or 4-D volume")
    volume = _volume_index(path, shape, frame)
    if axis not in (0, 1, 2):
        raise ImageLoadError(f"axis must be 0, 1 or 2, got {axis}")
    ornt = nib.io_orientation(img.affine)  # row i: voxel axis i -> RAS axis ornt[i, 0], flipped if -1
    voxel_axis = int(np.flatnonzero(ornt[:, 0] == axis)[0])
    n = shape[voxel_axis]
    k = n // 2 if index is None else int(index)
    if not -n <= k < n:
        raise ImageLoadError(f"{path}: slice {k} is out of range for {n} slices along axis {axis}")
    k %= n
    plane = [shape[i] for i in range(3) if i != voxel_axis]
    _check_size(path, f"the NIfTI slice plane (axis {axis})", tuple(plane), max_pixels_limit(max_pixels))
    slicer = [slice(None)] * 3 + ([volume] if volume is not None else [])
    slicer[voxel_axis] = k if ornt[voxel_axis, 1] > 0 else n - 1 - k
    data = _read_plane(img.dataobj, tuple(slicer), voxel_axis, shape)  # [rest of the voxel axes]
    rest = [i for i in range(3) if i != voxel_axis]
    for j, i in enumerate(rest):
        if ornt[i, 1] < 0:
            data = np.flip(data, j)
    if ornt[rest[0], 0] > ornt[rest[1], 0]:  # voxel order -> RAS order of the two shown axes
        data = data.T
    return _finite(np.ascontiguousarray(np.rot90(data)), path)


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


def _load_file(path: str, window, frame, axis, slice_index, max_pixels) -> Image.Image:
    if path.lower().endswith(_NIFTI_SUFFIXES):
        try:
            sl = read_slice(path, slice_index, 2 if axis is None else int(axis), frame, max_pixels)
        except ImageLoadError as e:
            raise ImageLoadError(e if str(e).startswith(path) else f"{path}: {e}") from None
        return to_pil(to_uint8(intensity_unit(sl, window)))
    if _is_dicom(path):
        d = read_dicom(path, frame, max_pixels)
        if d.is_color:
            return to_pil(d.values)
        return to_pil(to_uint8(d.unit(window)))
    with Image.open(path) as im:  # reads the header only; pixels are decoded by load()
        _check_size(path, "the image", (im.height, im.width), max_pixels_limit(max_pixels))
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
    max_pixels: int | None = None,
) -> Image.Image:
    """A medical image as an 8-bit RGB ``PIL.Image`` (module docstring has the intensity mapping).

    Args:
        source: a path (PNG/JPEG/... , ``.dcm`` or any file with the DICM preamble, ``.nii``/``.nii.gz``),
            a ``PIL.Image``, or a numpy array (uint8 as is; other dtypes through ``window``/min-max).
        window: (centre, width) overriding a DICOM file's window (with the file's VOI LUT function);
            for NIfTI and non-uint8 arrays the LINEAR window to use instead of min-max.
        frame: DICOM multi-frame frame / 4-D NIfTI volume.
        axis, slice_index: NIfTI slicing axis (0 sagittal, 1 coronal, 2 axial) and index.
        max_pixels: the most pixels the shown 2-D image may declare (default: ``$HEALTHGPT_MAX_PIXELS``
            or ``DEFAULT_MAX_PIXELS``); checked on the header, before anything is decoded.
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
        return _load_file(path, window, frame, axis, slice_index, max_pixels)
    except ImageLoadError:
        raise
    except Exception as e:  # pydicom, nibabel and Pillow raise many types for a bad file
        raise ImageLoadError(f"{path}: cannot read as an image ({type(e).__name__}: {e})") from e
