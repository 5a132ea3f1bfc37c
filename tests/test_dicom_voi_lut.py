"""DICOM display mapping beyond a plain window: the VOI LUT Sequence (PS3.3 C.11.2.1.1) and the
per-frame rescale/window of enhanced multi-frame files (PS3.3 C.7.6.16). Real files written by
pydicom from its bundled CT; the expected pixels are computed here from the standard's formulas."""

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from healthgpt import ImageLoadError, load_image
from healthgpt.data.images import read_dicom


def _ct():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    return ds, ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _with_voi_lut(ds, first_mapped: int, data: np.ndarray, bits: int):
    item = Dataset()
    item.add_new(0x00283002, "SS" if first_mapped < 0 else "US", [len(data), first_mapped, bits])  # LUT Descriptor
    item.add_new(0x00283006, "US", [int(v) for v in data])  # LUT Data
    ds.VOILUTSequence = Sequence([item])
    for name in ("WindowCenter", "WindowWidth"):
        if name in ds:
            del ds[name]
    return ds


def _lut_pixels(hu: np.ndarray, first_mapped: int, data: np.ndarray, bits: int) -> np.ndarray:
    index = np.clip(np.rint(hu).astype(np.int64) - first_mapped, 0, len(data) - 1)
    return np.rint(data[index] / (2**bits - 1) * 255).astype(np.uint8)


@pytest.mark.parametrize("bits", [8, 12])
def test_voi_lut_sequence_maps_the_modality_values(tmp_path, bits):
    ds, hu = _ct()
    rng = np.random.default_rng(bits)
    first, entries = -200, 700  # covers part of the range: values outside take the end entries
    data = np.sort(rng.integers(0, 2**bits, entries))
    _with_voi_lut(ds, first, data, bits).save_as(tmp_path / "lut.dcm")
    got = np.asarray(load_image(tmp_path / "lut.dcm"))[..., 0]
    want = _lut_pixels(hu, first, data, bits)
    assert (hu < first).any() and (hu > first + entries - 1).any()
    assert np.array_equal(got, want)
    minmax = np.rint((hu - hu.min()) / (hu.max() - hu.min()) * 255).astype(np.uint8)
    assert not np.array_equal(got, minmax)  # the LUT, not the fallback
    window = np.asarray(load_image(tmp_path / "lut.dcm", window=(40, 400)))[..., 0]
    assert np.array_equal(window, np.rint(np.clip((hu - 39.5) / 399 + 0.5, 0, 1) * 255).astype(np.uint8))


def test_voi_lut_sequence_monochrome1_is_inverted(tmp_path):
    ds, hu = _ct()
    data = np.arange(0, 256, dtype=np.int64)
    ds = _with_voi_lut(ds, -100, data, 8)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "inv.dcm")
    got = np.asarray(load_image(tmp_path / "inv.dcm"))[..., 0]
    assert np.array_equal(got, 255 - _lut_pixels(hu, -100, data, 8))


@pytest.mark.parametrize("descriptor, message", [
    ([16, 0, 40], "declares 40 bits per entry"),
    ([64, 0, 8], "declares 64 entries but the LUT Data holds 16"),
])
def test_a_bad_voi_lut_is_an_image_error(tmp_path, descriptor, message):
    ds, _ = _ct()
    ds = _with_voi_lut(ds, 0, np.arange(16), 8)
    ds.VOILUTSequence[0].LUTDescriptor = descriptor
    ds.save_as(tmp_path / "bad.dcm")
    with pytest.raises(ImageLoadError, match=message):
        load_image(tmp_path / "bad.dcm")


def _group(**macros) -> Dataset:
    item = Dataset()
    for name, attrs in macros.items():
        inner = Dataset()
        for key, value in attrs.items():
            setattr(inner, key, value)
        setattr(item, name, Sequence([inner]))
    return item


def test_enhanced_multi_frame_takes_each_frames_rescale_and_window(tmp_path):
    ds, _ = _ct()
    stored = ds.pixel_array.astype(np.int16)
    frames = np.stack([stored, stored[::-1], stored[:, ::-1]])
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    del ds["RescaleSlope"], ds["RescaleIntercept"]
    per_frame = [
        dict(slope=1.0, intercept=-1024.0, centre=40.0, width=400.0),
        dict(slope=2.0, intercept=-2048.0, centre=300.0, width=1500.0),
        dict(slope=1.0, intercept=-1024.0, centre=None, width=None),  # falls back to the shared window
    ]
    ds.PerFrameFunctionalGroupsSequence = Sequence([
        _group(
            PixelValueTransformationSequence=dict(RescaleSlope=f["slope"], RescaleIntercept=f["intercept"], RescaleType="HU"),
            **({} if f["centre"] is None else {"FrameVOILUTSequence": dict(WindowCenter=f["centre"], WindowWidth=f["width"])}),
        )
        for f in per_frame
    ])
    ds.SharedFunctionalGroupsSequence = Sequence([_group(FrameVOILUTSequence=dict(WindowCenter=-600.0, WindowWidth=1200.0))])
    ds.save_as(tmp_path / "enhanced.dcm")
    for i, f in enumerate(per_frame):
        hu = frames[i].astype(np.float64) * f["slope"] + f["intercept"]
        centre, width = (f["centre"], f["width"]) if f["centre"] is not None else (-600.0, 1200.0)
        want = np.rint(np.clip((hu - (centre - 0.5)) / (width - 1) + 0.5, 0, 1) * 255).astype(np.uint8)
        assert np.array_equal(read_dicom(tmp_path / "enhanced.dcm", frame=i).values, hu)
        assert np.array_equal(np.asarray(load_image(tmp_path / "enhanced.dcm", frame=i))[..., 0], want)

