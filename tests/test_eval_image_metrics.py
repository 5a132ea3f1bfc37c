"""SSIM / PSNR / MSE (computed by scikit-image) against an independent float64 transcription of
the module docstring's formulas, on real DICOM slices; grayscale conversion; LPIPS."""

import math

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from healthgpt.evaluation.image_metrics import image_scores, mse, psnr, resize_to, ssim, to_gray255
from healthgpt.evaluation.lpips import LPIPS, load_lpips, lpips_distance
from healthgpt.evaluation.scoring import summarise_images

def _slice(name):
    return to_gray255(pydicom.dcmread(get_testdata_file(name)).pixel_array)


def _ref_ssim(x, y, sigma=1.5, L=255.0):
    """Wang et al. 2004 as the module docstring states it: 11-tap Gaussian (sigma 1.5, radius 5),
    separable, half-sample symmetric borders, population covariance, 5-pixel border crop."""
    r = int(3.5 * sigma + 0.5)
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()

    def blur(a):
        p = np.pad(a, r, mode="symmetric")
        h, w = a.shape
        rows = sum(k[i] * p[i:i + h, :] for i in range(len(k)))
        return sum(k[i] * rows[:, i:i + w] for i in range(len(k)))

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mx, my = blur(x), blur(y)
    vx, vy, vxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s[r:-r, r:-r].mean())


def _ref_mse(x, y):
    return float(np.mean((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))


def _distortions(x, seed=0):
    rng = np.random.default_rng(seed)
    yield "noise", np.clip(x + rng.normal(0, 12, x.shape), 0, 255)
    yield "shift", np.roll(x, (2, -3), axis=(0, 1))
    yield "gamma", 255 * (x / 255) ** 0.7
    yield "quantised", np.round(x / 32) * 32
    yield "blocky", np.kron(x[::4, ::4], np.ones((4, 4)))[: x.shape[0], : x.shape[1]]
    yield "dark", x * 0.5


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_ssim_psnr_mse_match_the_formulas_on_dicom(name):
    x = _slice(name)
    assert x.min() == 0.0 and x.max() == 255.0          # int16 slice min-max rescaled
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    for _, y in _distortions(x):
        assert ssim(x, y) == pytest.approx(_ref_ssim(x, y), abs=1e-6)
        assert ssim(y, x) == pytest.approx(_ref_ssim(y, x), abs=1e-6)
        assert ssim(x, y) < 1.0
        assert mse(x, y) == pytest.approx(_ref_mse(x, y), rel=1e-12)
        assert psnr(x, y) == pytest.approx(10 * math.log10(255 ** 2 / _ref_mse(x, y)), rel=1e-12)


def test_ssim_across_modalities_and_uint8_inputs():
    ct, mr = _slice("CT_small.dcm"), _slice("MR_small.dcm")
    mr_up = resize_to(mr, ct.shape)
    assert mr_up.shape == ct.shape and 0 <= mr_up.min() and mr_up.max() <= 255
    assert ssim(ct, mr_up) == pytest.approx(_ref_ssim(ct, mr_up), abs=1e-6)
    a, b = ct.round().astype(np.uint8), mr_up.round().astype(np.uint8)
    assert ssim(a, b) == pytest.approx(_ref_ssim(a, b), abs=1e-6)


def test_known_values():
    z, o = np.zeros((16, 16)), np.ones((16, 16))
    assert mse(z, o) == 1.0
    assert psnr(z, o) == pytest.approx(20 * math.log10(255))
    assert math.isinf(psnr(o, o))
    assert ssim(o * 7, o * 7) == 1.0
    with pytest.raises(ValueError):
        ssim(np.zeros((8, 8)), np.zeros((8, 8)))          # smaller than the 11x11 window
    with pytest.raises(ValueError):
        mse(np.zeros((4, 4)), np.zeros((4, 5)))


def test_to_gray255_rules():
    rgb = np.zeros((5, 6, 3), np.uint8)
    rgb[..., 0] = 255
    red = np.full((5, 6), 0.299 * 255)
    assert to_gray255(Image.fromarray(rgb)) == pytest.approx(red)
    assert to_gray255(Image.fromarray(rgb).convert("RGBA")) == pytest.approx(red)
    assert to_gray255(rgb) == pytest.approx(red)
    assert to_gray255(np.transpose(rgb, (2, 0, 1))) == pytest.approx(red)
    assert to_gray255(Image.fromarray(rgb).convert("L")).dtype == np.float64
    f = np.linspace(0, 1, 16).reshape(4, 4)
    assert to_gray255(f) == pytest.approx(f * 255)                       # float in [0, 1]
    assert to_gray255(torch.tensor(f)) == pytest.approx(f * 255)
    assert to_gray255(f * 200) == pytest.approx(f * 200)                 # already 0..255
    hu = np.array([[-1000, 0], [500, 3000]], np.int16)                   # CT numbers: min-max
    assert to_gray255(hu) == pytest.approx(np.array([[0, 63.75], [95.625, 255]]))
    i16 = Image.fromarray(np.array([[0, 1000], [2000, 4000]], np.uint16))
    assert to_gray255(i16).max() == 255.0
    assert to_gray255(np.zeros((2, 2), bool)).sum() == 0
    with pytest.raises(ValueError):
        to_gray255(np.full((2, 2), np.nan))


def test_image_scores_resizes_target_and_flags_identical():
    x = _slice("CT_small.dcm")
    pred = Image.fromarray(x.round().astype(np.uint8))
    s = image_scores(pred, pred.copy())
    assert s["psnr"] is None and s["identical"] and s["mse"] == 0.0 and s["ssim"] == pytest.approx(1.0)
    big = pred.resize((256, 256), Image.BICUBIC)
    s = image_scores(pred, big)
    assert s["resized"] and 0.5 < s["ssim"] <= 1.0 and s["psnr"] > 20


def test_summary_excludes_identical_from_psnr_mean():
    scored = [dict(task="t", ssim=1.0, psnr=None, mse=0.0, identical=True),
              dict(task="t", ssim=0.5, psnr=30.0, mse=10.0, identical=False),
              dict(task="u", ssim=0.7, psnr=20.0, mse=20.0, identical=False)]
    s = summarise_images("super-resolution", scored, "unavailable: test")
    assert s["ssim"] == pytest.approx(100 * 2.2 / 3, abs=1e-3)
    assert s["psnr"] == 25.0 and s["mse"] == 10.0 and s["psnr_identical"] == 1
    assert s["psnr_of_mean_mse"] == pytest.approx(10 * math.log10(255 ** 2 / 10), abs=1e-3)
    assert s["lpips"] is None and s["lpips_status"] == "unavailable: test"
    assert s["tasks"]["t"]["n"] == 2 and s["tasks"]["t"]["psnr"] == 30.0
    all_same = summarise_images("reconstruction", scored[:1], "x")
    assert all_same["psnr"] is None and all_same["psnr_of_mean_mse"] is None


# ---- LPIPS -----------------------------------------------------------------------------------


def _random_lpips_files(tmp_path, net):
    torch.manual_seed(0)
    ref = LPIPS(net)
    for lin in ref.lins:                      # trained LPIPS linear weights are non-negative
        lin.weight.data.abs_()
    backbone = {f"features.{k[len('features.'):]}": v for k, v in ref.state_dict().items()
                if k.startswith("features.")}
    backbone["classifier.1.weight"] = torch.zeros(2, 2)            # torchvision extras: ignored
    linear = {f"lin{i}.model.1.weight": lin.weight.detach().clone() for i, lin in enumerate(ref.lins)}
    torch.save(backbone, tmp_path / f"{net}_backbone.pth")
    torch.save(linear, tmp_path / f"{net}_linear.pth")
    return ref, [tmp_path / f"{net}_backbone.pth", tmp_path / f"{net}_linear.pth"]


def test_lpips_from_local_random_weights(tmp_path):
    ref, files = _random_lpips_files(tmp_path, "alex")
    model = load_lpips(files)
    assert model.net_kind == "alex"
    x, y = _slice("CT_small.dcm"), _slice("MR_small.dcm")
    y = resize_to(y, x.shape)
    d = lpips_distance(model, x, y)
    assert d > 0 and math.isfinite(d)
    assert lpips_distance(model, x, x) == 0.0
    assert d == pytest.approx(lpips_distance(ref, x, y), rel=1e-6)
    assert d == pytest.approx(lpips_distance(model, y, x), rel=1e-5)   # symmetric
    # the lpips package's own layout (net.sliceK.N.*) in one file
    combined = {f"net.slice1.{k.split('.')[1]}.{k.split('.')[2]}": v
                for k, v in torch.load(files[0], weights_only=True).items() if k.startswith("features.")}
    combined.update(torch.load(files[1], weights_only=True))
    torch.save(combined, tmp_path / "lpips_full.pth")
    assert lpips_distance(load_lpips(tmp_path / "lpips_full.pth"), x, y) == pytest.approx(d, rel=1e-6)


def test_lpips_vgg_structure(tmp_path):
    _, files = _random_lpips_files(tmp_path, "vgg")
    model = load_lpips(files)
    assert model.net_kind == "vgg"
    x = np.random.default_rng(0).uniform(0, 255, (32, 32))
    assert lpips_distance(model, x, x[::-1].copy()) > 0


def test_lpips_missing_weights_fail_loudly(tmp_path):
    _, files = _random_lpips_files(tmp_path, "alex")
    with pytest.raises(ValueError, match="miss"):
        load_lpips(files[1])                         # linear layers only
    with pytest.raises(FileNotFoundError):
        load_lpips(tmp_path / "nope.pth")
