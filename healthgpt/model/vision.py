"""CLIP vision tower, its image preprocessing, and the per-task projectors.

Preprocessing (LLaVA "pad"): pad to a square with the mean colour ``round-down(255 * mean)``,
resize to ``size`` x ``size`` (bicubic), ``x = (pixel / 255 - mean) / std``. On a square image
this is exactly CLIP's resize-shortest-edge + centre-crop.

Hierarchical visual perception: a task reads CLIP hidden state ``layer`` (``hidden_states[0]`` is
the embedding output, ``[i]`` the output of layer i) without the CLS token: [N, patches, width].
Projector: ``Linear(width, H) -> GELU -> Linear(H, H)`` (LLaVA's ``mlp2x_gelu``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel

from healthgpt.model.files import from_pretrained_checked, require_hf_checkpoint

__all__ = ["ImageProcessor", "load_vision_tower", "build_projector", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_CLIP_TEXT_HALF = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")  # a full CLIP checkpoint


def expand_to_square(image: Image.Image, fill: tuple) -> Image.Image:
    """Centre ``image`` on a square canvas of its longer side filled with ``fill``."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


@dataclass(frozen=True)
class ImageProcessor:
    """CLIP input preprocessing (module docstring has the formula)."""

    size: int
    mean: tuple = OPENAI_CLIP_MEAN
    std: tuple = OPENAI_CLIP_STD

    @classmethod
    def from_dir(cls, path: str, size: int) -> "ImageProcessor":
        """Mean/std/crop size from ``preprocessor_config.json`` in ``path`` when present."""
        cfg_path = os.path.join(path, "preprocessor_config.json")
        if not os.path.isfile(cfg_path):
            return cls(size=size)
        with open(cfg_path) as f:
            cfg = json.load(f)
        crop = cfg.get("crop_size", size)
        crop = crop.get("height", size) if isinstance(crop, dict) else int(crop)
        if crop != size:
            raise ValueError(f"{cfg_path}: crop size {crop} differs from the vision tower's image_size {size}")
        return cls(size=size, mean=tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)), std=tuple(cfg.get("image_std", OPENAI_CLIP_STD)))

    def __call__(self, images) -> torch.Tensor:
        """PIL image(s) -> float32 tensor [N, 3, size, size]."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        fill = tuple(int(m * 255) for m in self.mean)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        out = []
        for img in images:
            img = expand_to_square(img.convert("RGB"), fill).resize((self.size, self.size), Image.BICUBIC)
            x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
            out.append((x - mean) / std)
        return torch.stack(out)


def load_vision_tower(path: str | None, config: dict | None, dtype: torch.dtype, attn_implementation: str):
    """``transformers.CLIPVisionModel`` from local ``path`` or, when ``path`` is None, random from ``config``."""
    if path is None:
        model = CLIPVisionModel._from_config(CLIPVisionConfig(**config), attn_implementation=attn_implementation, dtype=dtype)
    else:
        require_hf_checkpoint(path, "vision tower", "openai/clip-vit-large-patch14-336")
        model = from_pretrained_checked(
            CLIPVisionModel, path, "vision tower", ignore_unexpected=_CLIP_TEXT_HALF,
            dtype=dtype, attn_implementation=attn_implementation,
        )
    model.requires_grad_(False)
    return model


def build_projector(vision_width: int, hidden: int, dtype: torch.dtype) -> nn.Sequential:
    """``Linear(vision_width, hidden) -> GELU -> Linear(hidden, hidden)``; keys ``0.*`` and ``2.*``."""
    return nn.Sequential(nn.Linear(vision_width, hidden), nn.GELU(), nn.Linear(hidden, hidden)).to(dtype)
