"""LPIPS (Zhang et al. 2018, version 0.1) from local weight files; nothing is downloaded.

    d(x, y) = sum_l  mean_{h,w}  w_l . (f_l(x)/||f_l(x)|| - f_l(y)/||f_l(y)||)^2

``x, y`` are RGB in [-1, 1], first shifted and scaled per channel (shift ``[-.030, -.088, -.188]``,
scale ``[.458, .448, .450]``); ``f_l`` are the backbone's ReLU outputs (AlexNet: relu1..relu5,
channels 64/192/384/256/256; VGG16: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, channels
64/128/256/512/512), unit-normalised over channels (``eps = 1e-10``); ``w_l >= 0`` are the
learned 1x1 "linear" layers. The paper's Table 3 prints ``100 d``.

Weights (one or more files, ``torch.save`` state dicts or ``.safetensors``, merged):

- backbone: torchvision's ``alexnet``/``vgg16`` state dict (keys ``features.N.weight|bias``;
  ``classifier.*`` is ignored), or the ``lpips`` package's ``net.sliceK.N.*`` keys;
- linear layers: the ``lpips`` package's ``weights/v0.1/alex.pth`` / ``vgg.pth``
  (keys ``linL.model.1.weight``, shape ``[1, C, 1, 1]``).

The backbone kind is read from the weights. Missing keys are an error; unknown keys a warning.
Grayscale 0..255 images (``image_metrics.to_gray255``) enter as three equal channels,
``g / 127.5 - 1``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from torch import nn

__all__ = ["LPIPS", "load_lpips", "lpips_distance", "NETS"]

NETS = {
    # kind: (feature layer spec, tap indices after which a ReLU output is read, channels)
    "alex": ([("c", 3, 64, 11, 4, 2), "r", "m", ("c", 64, 192, 5, 1, 2), "r", "m",
              ("c", 192, 384, 3, 1, 1), "r", ("c", 384, 256, 3, 1, 1), "r",
              ("c", 256, 256, 3, 1, 1), "r"], (1, 4, 7, 9, 11), (64, 192, 384, 256, 256)),
    "vgg": (None, (3, 8, 15, 22, 29), (64, 128, 256, 512, 512)),
}


def _vgg16_spec():
    spec, cin = [], 3
    for v in (64, 64, "m", 128, 128, "m", 256, 256, 256, "m", 512, 512, 512, "m", 512, 512, 512):
        if v == "m":
            spec.append("m")
        else:
            spec += [("c", cin, v, 3, 1, 1), "r"]
            cin = v
    return spec


def _build(spec, pool: int) -> nn.Sequential:
    layers = []
    for s in spec:
        if s == "r":
            layers.append(nn.ReLU(inplace=False))
        elif s == "m":
            layers.append(nn.MaxPool2d(kernel_size=pool, stride=2))
        else:
            _, cin, cout, k, stride, pad = s
            layers.append(nn.Conv2d(cin, cout, k, stride=stride, padding=pad))
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """LPIPS v0.1 distance with an AlexNet or VGG16 backbone (random until weights are loaded)."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        if net not in NETS:
            raise ValueError(f"net must be one of {sorted(NETS)}, got {net!r}")
        spec, taps, chans = NETS[net]
        self.net_kind = net
        self.features = _build(spec if spec is not None else _vgg16_spec(), 3 if net == "alex" else 2)
        self.taps = taps
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in chans)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def _feats(self, x):
        out, last = [], self.taps[-1]
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + 1e-10))
            if i == last:
                break
        return out

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distances ``[N]`` between two ``[N, 3, H, W]`` batches in [-1, 1]."""
        x = (x - self.shift) / self.scale
        y = (y - self.shift) / self.scale
        total = 0
        for lin, fx, fy in zip(self.lins, self._feats(x), self._feats(y)):
            total = total + lin((fx - fy) ** 2).mean(dim=(2, 3))
        return total.view(-1)


def _read(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return sd


_SLICE = re.compile(r"^(?:module\.)?net\.slice\d+\.(\d+)\.(weight|bias)$")
_FEAT = re.compile(r"^(?:module\.)?(?:features\.)?(\d+)\.(weight|bias)$")
_LIN = re.compile(r"^(?:module\.)?lin(\d+)\.model\.1\.weight$")
_IGNORED = re.compile(r"^(?:module\.)?(classifier\.|scaling_layer\.|net\.scaling_layer\.)")


def load_lpips(paths, net: str | None = None, device="cpu") -> LPIPS:
    """Build an ``LPIPS`` from local weight file(s) (formats in the module docstring).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for missing keys or
    mismatched shapes; warns about keys it does not know."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    merged: dict[str, torch.Tensor] = {}
    for p in paths:
        merged.update(_read(p))
    state, unknown = {}, []
    for k, v in merged.items():
        if m := _LIN.match(k):
            state[f"lins.{m.group(1)}.weight"] = v
        elif m := (_SLICE.match(k) or _FEAT.match(k)):
            state[f"features.{m.group(1)}.{m.group(2)}"] = v
        elif not _IGNORED.match(k):
            unknown.append(k)
    if net is None:
        w0 = state.get("features.0.weight")
        l1 = state.get("lins.1.weight")
        if w0 is not None:
            net = "alex" if w0.shape[-1] == 11 else "vgg"
        elif l1 is not None:
            net = "alex" if l1.shape[1] == 192 else "vgg"
        else:
            raise ValueError("LPIPS weights hold neither backbone nor linear-layer keys")
    model = LPIPS(net)
    expected = {k for k in model.state_dict() if k not in ("shift", "scale")}
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(f"LPIPS ({net}) weights miss {len(missing)} keys, e.g. {missing[:4]}; "
                         "pass both the backbone and the linear-layer files")
    extra = sorted(set(state) - expected)
    if unknown or extra:
        warnings.warn(f"LPIPS: ignoring unknown keys {(unknown + extra)[:6]}", stacklevel=2)
    ref = model.state_dict()
    for k in expected:
        if tuple(state[k].shape) != tuple(ref[k].shape):
            raise ValueError(f"LPIPS key {k}: shape {tuple(state[k].shape)}, expected {tuple(ref[k].shape)}")
    model.load_state_dict({k: state[k].float() for k in expected}, strict=False)
    return model.to(device)


def lpips_distance(model: LPIPS, prediction, target) -> float:
    """LPIPS between two grayscale 0..255 float images of the same shape (not x100)."""
    def prep(a):
        t = torch.as_tensor(a, dtype=torch.float32, device=model.shift.device)
        return (t / 127.5 - 1.0).expand(1, 3, *t.shape)
    return float(model(prep(prediction), prep(target))[0])
