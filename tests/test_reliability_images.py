"""Reliability of the image reader (issue 12): files that declare huge sizes are refused before
anything is decoded, only the shown slice/frame is read, non-finite voxels are counted and do not
blank the image, legacy DICOM without a Part-10 header is read. Memory is measured with
tracemalloc (numpy, zlib and Python buffers report to it); tests never assert times."""

import gzip
import io
import struct
import tracemalloc
import zlib

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from healthgpt.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    NonFiniteVoxelsWarning,
    load_image,
    read_slice,
    read_volume,
    take_slice,
)

MB = 1 << 20


def _peak_bytes(fn):
    """(result or exception, peak traced bytes) of ``fn()``."""
    tracemalloc.start()
    try:
        try:
            out = fn()
        except Exception as e:  # the caller asserts which
            out = e
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _nifti_header(shape, dtype) -> bytes:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr["vox_offset"] = 352
    hdr.set_qform(np.eye(4), code=1)
    return hdr.binaryblock + b"\0" * 4


def test_huge_declared_nifti_is_refused_before_decoding(tmp_path):
    """A tiny .nii.gz declaring a 1024^3 volume (4 GiB as float32): the shown slice is read through
    the array proxy, so the truncated body is an error naming the file, with memory near one slice."""
    path = tmp_path / "huge.nii.gz"
    with gzip.open(path, "wb") as f:
        f.write(_nifti_header((1024, 1024, 1024), np.float32))
        f.write(np.random.default_rng(0).standard_normal(4096).astype(np.float32).tobytes())
    assert path.stat().st_size < 64 * 1024
    err, peak = _peak_bytes(lambda: load_image(path))
    assert isinstance(err, ImageLoadError) and "huge.nii.gz" in str(err)
    assert peak < 64 * MB  # one 1024^2 slice is 4 MiB (8 as float64); the volume 4 GiB
    # a slice plane beyond the pixel limit is refused from the header alone
    wide = tmp_path / "wide.nii.gz"
    with gzip.open(wide, "wb") as f:
        f.write(_nifti_header((30_000, 30_000, 2), np.uint8))  # NIfTI-1 dims are int16
    with pytest.raises(ImageLoadError, match=r"wide\.nii\.gz: the NIfTI slice plane .* 30000 x 30000 = 900,000,000 pixels, over the limit of"):
        load_image(wide)


def test_nifti_reads_only_the_shown_slice_of_a_large_volume(tmp_path):
    """A valid 512^3 uint8 volume (512 MiB as float32): every axis's slice equals the whole-volume
    reference (``take_slice(read_volume(...))`` = nibabel's canonical volume) while the load peaks
    at a few slices' worth."""
    n = 512
    rng = np.random.default_rng(1)
    mark = rng.integers(1, 255, (n, n), dtype=np.uint8)
    path = tmp_path / "big.nii.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(_nifti_header((n, n, n), np.uint8))
        zero = bytes(n * n)
        for k in range(n):
            f.write(mark.tobytes(order="F") if k == n // 2 else zero)
    img, peak = _peak_bytes(lambda: load_image(path))
    assert not isinstance(img, Exception), img
    assert peak < 24 * MB
    sl = np.rot90(mark.astype(np.float64))
    want = np.rint((sl - sl.min()) / (sl.max() - sl.min()) * 255).astype(np.uint8)
    assert np.array_equal(np.asarray(img)[..., 0], want)
    sagittal, peak = _peak_bytes(lambda: read_slice(path, n // 3, axis=0))
    assert peak < 48 * MB  # 32 MiB slabs, never the volume
    assert sagittal.dtype == np.float32 and np.array_equal(sagittal[n - 1 - n // 2], mark[n // 3].astype(np.float32))  # rot90: z up


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_nifti_slice_through_the_proxy_equals_the_canonical_volume(tmp_path, axis):
    """Odd shapes, permuted and flipped affines, 4-D: ``read_slice`` == nibabel's
    ``as_closest_canonical`` volume sliced by ``take_slice``, for every slice index kind."""
    rng = np.random.default_rng(axis)
    data = rng.standard_normal((7, 9, 11, 3)).astype(np.float32)
    for perm in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        affine = np.eye(4)
        affine[:3, :3] = 0
        for i, (p, s) in enumerate(zip(perm, rng.choice([-1.0, 1.0], 3))):
            affine[p, i] = s * (1.0 + i)
        path = tmp_path / f"v{''.join(map(str, perm))}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), path)
        canonical = np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj, dtype=np.float32)
        for frame in (None, 2):
            volume = canonical[..., 0 if frame is None else frame]
            assert np.array_equal(read_volume(path, frame), volume)
            for index in (None, 0, -1, 4):
                got = read_slice(path, index, axis, frame)
                assert np.array_equal(got, take_slice(volume, index, axis))


def test_nonfinite_voxels_are_counted_and_windowed_on_finite_values(tmp_path):
    """One NaN and two infinities no longer blank the slice: they take the finite range's ends
    (NaN, -inf -> lowest; +inf -> highest), min-max runs on the finite values, a warning counts 3."""
    rng = np.random.default_rng(2)
    data = rng.uniform(-100.0, 300.0, (6, 5, 3)).astype(np.float32)
    data[1, 2, 1], data[3, 0, 1], data[4, 4, 1] = np.nan, np.inf, -np.inf
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with pytest.warns(NonFiniteVoxelsWarning, match=r"nan\.nii\.gz: 3 non-finite voxel") as caught:
        got = np.asarray(load_image(path))[..., 0]
    assert len(caught) == 1
    ref = data[:, :, 1].astype(np.float64)
    finite = ref[np.isfinite(ref)]
    lo, hi = finite.min(), finite.max()
    ref = np.where(np.isposinf(ref), hi, np.where(np.isfinite(ref), ref, lo))
    want = np.rint((np.rot90(ref) - lo) / (hi - lo) * 255).astype(np.uint8)
    assert np.array_equal(got, want) and got.max() == 255 and len(np.unique(got)) > 10
    with pytest.warns(NonFiniteVoxelsWarning, match="3 non-finite"):  # the converters' whole-volume read too
        assert np.isfinite(read_volume(path)).all()


def _png_header_only(path, width, height):
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(width + 1)))
                     + chunk(b"IEND", b""))


def test_png_declaring_huge_size_is_refused_before_decoding(tmp_path, monkeypatch):
    """A 12000^2 PNG (below Pillow's own limit) is refused from its header with the declared size
    and the limit; the limit is configurable by argument and by environment."""
    path = tmp_path / "bomb.png"
    _png_header_only(path, 12000, 12000)
    err, peak = _peak_bytes(lambda: load_image(path))
    assert isinstance(err, ImageLoadError), err
    assert "bomb.png" in str(err) and "12000 x 12000 = 144,000,000 pixels" in str(err)
    assert f"limit of {DEFAULT_MAX_PIXELS:,}" in str(err)
    assert peak < 4 * MB
    small = tmp_path / "small.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(small)
    assert load_image(small).size == (40, 30)
    with pytest.raises(ImageLoadError, match=r"30 x 40 = 1,200 pixels, over the limit of 1,000"):
        load_image(small, max_pixels=1000)
    monkeypatch.setenv("HEALTHGPT_MAX_PIXELS", "1199")
    with pytest.raises(ImageLoadError, match="over the limit of 1,199"):
        load_image(small)
    monkeypatch.setenv("HEALTHGPT_MAX_PIXELS", "lots")
    with pytest.raises(ImageLoadError, match="HEALTHGPT_MAX_PIXELS must be a whole number"):
        load_image(small)


def _dicom_dataset(rows, cols, frames):
    ds = pydicom.Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.Modality = "OT"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    return ds


def test_huge_declared_deflated_dicom_is_refused_before_inflating(tmp_path):
    """A small deflated DICOM declaring 32 frames of 4096^2 (1 GiB inflated): pydicom would inflate
    it whole to reach any frame, so its declared size counts every frame and is refused first."""
    ds = _dicom_dataset(4096, 4096, 32)
    body = io.BytesIO()
    pydicom.filewriter.write_dataset(pydicom.filebase.DicomFileLike(body), _explicit_le(ds))
    body.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, 32 * 4096 * 4096 * 2))
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = deflater.compress(body.getvalue()) + deflater.compress(bytes(8 * MB)) + deflater.flush()
    path = tmp_path / "frames.dcm"
    path.write_bytes(_part10_head(ds, DeflatedExplicitVRLittleEndian) + deflated)
    assert path.stat().st_size < 1 * MB
    err, peak = _peak_bytes(lambda: load_image(path))
    assert isinstance(err, ImageLoadError), err
    assert "frames.dcm" in str(err) and "32 x 4096 x 4096 = 536,870,912 pixels" in str(err)
    assert peak < 8 * MB


def test_multiframe_dicom_decodes_only_the_shown_frame(tmp_path):
    """16 frames of 1024^2 (32 MiB stored, 128 MiB as float64): the chosen frame equals pydicom's
    full decode of it, and loading peaks near one frame."""
    rows = cols = 1024
    frames = np.random.default_rng(4).integers(0, 4096, (16, rows, cols), dtype=np.uint16)
    ds = _dicom_dataset(rows, cols, 16)
    ds.PixelData = frames.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "multi.dcm"
    ds.save_as(path, enforce_file_format=True)
    del ds
    img, peak = _peak_bytes(lambda: load_image(path, frame=5))
    assert not isinstance(img, Exception), img
    assert peak < 40 * MB
    f = frames[5].astype(np.float64)
    assert np.array_equal(np.asarray(img)[..., 0], np.rint((f - f.min()) / (f.max() - f.min()) * 255).astype(np.uint8))
    with pytest.raises(ImageLoadError, match=r"multi\.dcm: the DICOM frame declares 1024 x 1024 .* limit of 1,000,000"):
        load_image(path, max_pixels=1_000_000)


def _explicit_le(ds):
    ds = ds.copy()
    ds.set_original_encoding(False, True)
    return ds


def _part10_head(ds, syntax) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(pydicom.filebase.DicomFileLike(out), meta)
    return out.getvalue()


@pytest.mark.parametrize("name", ["MR_small.dcm", "CT_small.dcm"])
def test_legacy_dicom_without_part10_header_is_read(tmp_path, name):
    """The preamble and file meta stripped (an ACR-NEMA style file): read with force, same pixels."""
    src = get_testdata_file(name)
    raw = open(src, "rb").read()
    meta_end = 132 + 12 + struct.unpack("<I", raw[140:144])[0]  # group length value after the 'UL' header
    legacy = tmp_path / "legacy.dcm"
    legacy.write_bytes(raw[meta_end:])
    assert legacy.read_bytes()[128:132] != b"DICM"
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(legacy)  # what the reader used to hit
    assert np.array_equal(np.asarray(load_image(legacy)), np.asarray(load_image(src)))
    assert np.array_equal(np.asarray(load_image(legacy, window=(40, 400))), np.asarray(load_image(src, window=(40, 400))))


@pytest.mark.parametrize("out, message", [("x.xyz", "cannot write '.xyz' images"), ("noext", "without an extension"),
                                          (".", "is a directory"), ("missing/x.png", "does not exist")])
def test_generate_checks_the_output_path_before_generating(tmp_path, monkeypatch, capsys, out, message):
    """``generate --out`` that cannot be written is refused before the image is read or a model built."""
    import healthgpt.cli.infer as infer
    from healthgpt.cli import main as cli_main

    def never(*args, **kwargs):
        raise AssertionError("reached the image or the model before the output check")

    monkeypatch.setattr(infer, "model_from_args", never)
    monkeypatch.setattr(infer, "image_from_args", never)
    monkeypatch.chdir(tmp_path)
    try:
        code = cli_main(["generate", "--instruction", "Convert.", "--out", out])
    except SystemExit as e:
        code = e.code
    assert code == 2 and message in capsys.readouterr().err
    assert infer.check_output_image("ok.png") == "PNG" and infer.check_output_image("ok.TIF") == "TIFF"
