"""Image metrics of the paper's Tables 2, 3 and 11: SSIM (x100), PSNR (dB) and MSE on 0..255.

Conversion (``to_gray255``), applied identically to predictions and targets:

- PIL images in 8-bit modes (``L``, ``P``, ``RGB``, ``RGBA``, ...) are taken as RGB and reduced
  to luma ``Y = 0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601, PIL's weights) in float64 without
  rounding; ``L`` images keep their values. Alpha is ignored.
- PIL images in ``I``/``I;16``/``F`` modes and arrays/tensors: a trailing (H, W, 3|4) or leading
  (3, H, W) channel axis is reduced to luma the same way (channel-last wins when both fit). Values are then placed on 0..255:
  ``bool`` -> x255; floating data inside [0, 1] -> x255; data already inside [0, 255] -> as is;
  anything else (16-bit CT numbers, Hounsfield units) -> min-max rescaled to [0, 255].

``resize_to(img, shape)`` resizes a 0..255 float image with PIL bicubic (clipped to 0..255); the
runner uses it to bring a target to the prediction's size when they differ.

Formulas (x = target, y = prediction, both float64 on 0..255, L = 255):

- ``mse = mean((x - y)^2)``.
- ``psnr = 10 log10(L^2 / mse)``; ``+inf`` when ``mse == 0`` (identical images). Summaries
  average PSNR over the pairs with ``mse > 0`` and count the identical ones separately
  (``psnr_identical``); ``psnr_of_mean_mse = 10 log10(L^2 / mean mse)`` is reported too.
- SSIM (Wang et al. 2004): Gaussian weights w with sigma 1.5 truncated at radius
  ``int(3.5 sigma + 0.5) = 5`` (an 11x11 window, normalised to sum 1), applied separably with
  half-sample symmetric ("reflect") borders; ``mu_x = w*x``, ``sigma_x^2 = w*(x^2) - mu_x^2``,
  ``sigma_xy = w*(xy) - mu_x mu_y`` (population covariance), ``C1 = (0.01 L)^2``,
  ``C2 = (0.03 L)^2``, ``S = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)
  (sigma_x^2 + sigma_y^2 + C2))``; SSIM is the mean of S after cropping 5 pixels from each
  border. Computed by ``skimage.metrics.structural_similarity(x, y, gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=255)``; MSE and PSNR by
  ``skimage.metrics.mean_squared_error`` / ``peak_signal_noise_ratio``. Images must be at least 11x11.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from skimage import metrics as skm

__all__ = ["to_gray255", "resize_to", "mse", "psnr", "ssim", "image_scores"]

_LUMA = np.array([0.299, 0.587, 0.114])
_EIGHT_BIT_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


def _luma(a: np.ndarray) -> np.ndarray:
    if a.ndim == 3:
        if a.shape[-1] in (3, 4):
            return a[..., :3] @ _LUMA
        if a.shape[0] in (3, 4):
            return np.tensordot(_LUMA, a[:3], axes=1)
        if a.shape[-1] == 1:
            return a[..., 0]
        if a.shape[0] == 1:
            return a[0]
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D image or one with 1, 3 or 4 channels, got shape {a.shape}")
    return a


def to_gray255(img) -> np.ndarray:
    """A float64 (H, W) image on 0..255 (rules in the module docstring)."""
    if isinstance(img, Image.Image):
        if img.mode in _EIGHT_BIT_MODES:
            if img.mode == "L":
                return np.asarray(img, dtype=np.float64)
            return np.asarray(img.convert("RGB"), dtype=np.float64) @ _LUMA
        img = np.asarray(img)
    if hasattr(img, "detach"):  # torch tensor
        img = img.detach().cpu().float().numpy()
    a = np.asarray(img)
    if a.dtype == bool:
        return _luma(a.astype(np.float64) * 255.0)
    floating = np.issubdtype(a.dtype, np.floating)
    a = _luma(a.astype(np.float64))
    if not np.all(np.isfinite(a)):
        raise ValueError("image holds NaN or infinite values")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if floating and lo >= 0.0 and hi <= 1.0:
        return a * 255.0
    if lo >= 0.0 and hi <= 255.0:
        return a
    if hi == lo:
        return np.zeros_like(a)
    return (a - lo) / (hi - lo) * 255.0


def resize_to(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a 0..255 float image to ``shape`` (H, W): PIL bicubic in float, clipped to 0..255."""
    if tuple(img.shape) == tuple(shape):
        return img
    out = Image.fromarray(np.asarray(img, dtype=np.float32), mode="F").resize(
        (int(shape[1]), int(shape[0])), Image.BICUBIC)
    return np.clip(np.asarray(out, dtype=np.float64), 0.0, 255.0)


def _pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    return x, y


def mse(x, y) -> float:
    """``mean((x - y)^2)`` of two same-shape float images (0..255 expected)."""
    x, y = _pair(x, y)
    return float(skm.mean_squared_error(x, y))


def psnr(x, y, data_range: float = 255.0) -> float:
    """``10 log10(data_range^2 / mse)`` in dB; ``math.inf`` for identical images."""
    x, y = _pair(x, y)
    if np.array_equal(x, y):  # skimage divides by zero (a RuntimeWarning) and returns inf
        return math.inf
    return float(skm.peak_signal_noise_ratio(x, y, data_range=data_range))


_SSIM_TRUNCATE = 3.5  # skimage's fixed Gaussian truncation: radius int(3.5 sigma + 0.5)


def ssim(x, y, data_range: float = 255.0, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean SSIM in [-1, 1] with a Gaussian window (formula in the module docstring)."""
    x, y = _pair(x, y)
    if x.ndim != 2:
        raise ValueError(f"ssim expects 2-D grayscale images, got shape {x.shape}")
    side = 2 * int(_SSIM_TRUNCATE * sigma + 0.5) + 1
    if min(x.shape) < side:
        raise ValueError(f"images must be at least {side}x{side} for SSIM, got {x.shape}")
    return float(skm.structural_similarity(x, y, data_range=data_range, gaussian_weights=True, sigma=sigma,
                                           use_sample_covariance=False, K1=k1, K2=k2))


def image_scores(prediction, target) -> dict:
    """``{ssim, psnr, mse}`` of one pair after ``to_gray255``; the target is resized to the
    prediction's size when they differ (``resized: True``). ``psnr`` is ``None`` when identical."""
    p, t = to_gray255(prediction), to_gray255(target)
    resized = p.shape != t.shape
    if resized:
        t = resize_to(t, p.shape)
    ps = psnr(t, p)
    return {"ssim": ssim(t, p), "psnr": None if math.isinf(ps) else ps, "mse": mse(t, p),
            "identical": math.isinf(ps), "resized": resized}
