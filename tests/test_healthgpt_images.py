"""Medical image input: PNG/JPEG, DICOM (pydicom's test files), NIfTI (nibabel's test files)."""

import os

import nibabel
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_windowing

from healthgpt import ImageLoadError, load_image
from healthgpt.data.images import voi_window
from healthgpt.model.vision import ImageProcessor

NIB_DATA = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data")


def _linear_window(x, c, w):
    return np.clip(np.rint(((x - (c - 0.5)) / (w - 1) + 0.5) * 255), 0, 255).astype(np.uint8)


def test_dicom_ct_uses_modality_lut_and_min_max_without_window():
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert "WindowCenter" not in ds
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (128, 128)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    want = np.rint((hu - hu.min()) / (hu.max() - hu.min()) * 255).astype(np.uint8)
    got = np.asarray(img)
    assert np.array_equal(got[..., 0], want) and np.array_equal(got[..., 0], got[..., 2])
    # an explicit window (e.g. soft tissue 40/400 HU) overrides
    soft = np.asarray(load_image(path, window=(40, 400)))[..., 0]
    assert np.array_equal(soft, _linear_window(hu, 40, 400))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # pydicom's sigmoid
@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize("center, width", [(40.0, 400.0), (-600.0, 1500.0), (35.5, 1.0), (0.0, 2.0)])
def test_voi_window_is_pydicoms_windowing(function, center, width):
    """Our window against pydicom's implementation of PS3.3 C.11.2.1.2 on a real CT (HU), its
    output range rescaled to [0, 1]; the edges land exactly where the standard puts them."""
    if function != "LINEAR" and width == 1.0:
        width = 0.5
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    hu = np.concatenate([hu.ravel(), center + np.arange(-3, 4) * 0.5, center - 0.5 + np.array([-1, 1]) * (width - 1) / 2])
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = center, width, function
    y = apply_windowing(hu.copy(), ds)
    lo = -(2 ** (ds.BitsStored - 1)) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    hi = (2 ** (ds.BitsStored - 1) - 1) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    want = (y - lo) / (hi - lo)
    got = voi_window(hu, center, width, function)
    assert got.dtype == np.float64 and not np.isnan(got).any()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert 0.0 < want.mean() < 1.0


def test_voi_window_rejects_bad_widths():
    with pytest.raises(ImageLoadError, match="width must be >= 1"):
        voi_window(np.zeros(3), 0, 0.5)
    with pytest.raises(ImageLoadError, match="width must be > 0"):
        voi_window(np.zeros(3), 0, 0, "SIGMOID")
    with pytest.raises(ImageLoadError, match="VOI LUT function"):
        voi_window(np.zeros(3), 0, 10, "GAMMA")


def test_dicom_monochrome1_is_inverted_after_the_window(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "inverted.dcm")
    got = np.asarray(load_image(tmp_path / "inverted.dcm", window=(40, 400)))[..., 0]
    unit = np.clip((hu - 39.5) / 399 + 0.5, 0, 1)
    assert np.array_equal(got, np.rint((1 - unit) * 255).astype(np.uint8))
    assert got[hu > 400].max() == 0 and got[hu < -300].min() == 255  # bone black, air white


def test_dicom_palette_colour_goes_through_its_lookup_table():
    ds = pydicom.dcmread(get_testdata_file("examples_palette.dcm"))
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    got = np.asarray(load_image(get_testdata_file("examples_palette.dcm")))
    rgb = apply_color_lut(ds.pixel_array, ds).astype(np.float64)  # 16-bit table entries
    assert got.shape == (*ds.pixel_array.shape, 3)
    assert np.array_equal(got, np.rint(rgb / 65535 * 255).astype(np.uint8))
    assert not np.array_equal(got[..., 0], got[..., 2])  # colour, not grey


def test_dicom_mr_uses_the_files_window():
    path = get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    got = np.asarray(load_image(path))[..., 0]
    assert got.shape == (64, 64)
    assert np.array_equal(got, _linear_window(ds.pixel_array.astype(float), float(ds.WindowCenter), float(ds.WindowWidth)))


def test_dicom_multi_frame_picks_a_frame():
    path = get_testdata_file("rtdose.dcm")
    frames = pydicom.dcmread(path).pixel_array.astype(float)
    assert frames.shape[0] == 15
    default = np.asarray(load_image(path))[..., 0]  # the middle frame
    first = np.asarray(load_image(path, frame=0))[..., 0]

    def minmax(a):
        return np.rint((a - a.min()) / (a.max() - a.min()) * 255).astype(np.uint8)

    assert np.array_equal(default, minmax(frames[7])) and np.array_equal(first, minmax(frames[0]))
    with pytest.raises(ImageLoadError, match="frame 15 is out of range"):
        load_image(path, frame=15)


def test_nifti_axis_and_slice():
    path = os.path.join(NIB_DATA, "anatomical.nii")
    vol = nibabel.as_closest_canonical(nibabel.load(path)).get_fdata()
    assert vol.shape == (33, 41, 25)
    axial = load_image(path)
    assert axial.size == (33, 41)  # rot90 of a [33, 41] slice: 41 rows, 33 columns
    sl = np.rot90(vol[:, :, 12])
    want = np.rint((sl - sl.min()) / (sl.max() - sl.min()) * 255).astype(np.uint8)
    assert np.array_equal(np.asarray(axial)[..., 0], want)
    sagittal = load_image(path, axis=0, slice_index=3)
    assert sagittal.size == (41, 25)
    with pytest.raises(ImageLoadError, match="slice 99 is out of range"):
        load_image(path, slice_index=99)


def test_nifti_4d_picks_a_volume():
    path = os.path.join(NIB_DATA, "example4d.nii.gz")
    a, b = load_image(path), load_image(path, frame=1)
    assert a.size == b.size and not np.array_equal(np.asarray(a), np.asarray(b))


def test_png_and_jpeg(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "x.png")), rgb)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.jpg")
    assert load_image(str(tmp_path / "g.jpg")).mode == "RGB"
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 200)).save(tmp_path / "deep.png")  # 16-bit greyscale
    deep = np.asarray(load_image(tmp_path / "deep.png"))
    assert deep.dtype == np.uint8 and deep.max() == 255 and deep.min() == 0


def test_unreadable_inputs(tmp_path):
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageLoadError, match="cannot read"):
        load_image(tmp_path / "junk.png")
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 64)
    with pytest.raises(ImageLoadError, match="junk.dcm"):
        load_image(tmp_path / "junk.dcm")
    (tmp_path / "junk.nii").write_bytes(b"\0" * 64)
    with pytest.raises(ImageLoadError, match="junk.nii"):
        load_image(tmp_path / "junk.nii")


def test_clip_preprocessing_pads_with_the_mean_colour():
    proc = ImageProcessor(size=28)
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    x = proc(img)
    assert x.shape == (1, 3, 28, 28)
    fill = np.array([int(m * 255) for m in proc.mean]) / 255.0
    corner = x[0, :, 0, 0].numpy()
    np.testing.assert_allclose(corner, (fill - np.array(proc.mean)) / np.array(proc.std), atol=1e-5)
    centre = x[0, :, 14, 14].numpy()
    np.testing.assert_allclose(centre, (1.0 - np.array(proc.mean)) / np.array(proc.std), atol=1e-5)
