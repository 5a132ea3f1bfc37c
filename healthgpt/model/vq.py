"""The image tokenizer: taming's Gumbel VQGAN (OpenImages f=8, 8192 codes) on ``diffusers.VQModel``.

``diffusers.VQModel`` holds the encoder, ``quant_conv``, the codebook, ``post_quant_conv`` and the
decoder; the Gumbel quantizer's 1x1 projection to code logits has no slot there and is ``proj``::

    encode: ids[b, i, j] = argmax_n proj(quant_conv(encoder(x)))[b, n, i, j]       (row-major -> [B, g*g])
    decode: x = decoder(post_quant_conv(codebook[ids]))

``argmax`` is taming's Gumbel quantizer without its noise (which it adds even in eval), so
encoding is deterministic. Images are 3 x 256 x 256 in [-1, 1]; f=8 gives g = 32, 1024 ids.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from diffusers import VQModel
from PIL import Image
from safetensors.torch import load_file, save_file

from healthgpt.model.config import JsonConfig
from hlora.files import atomic_write

__all__ = ["VQConfig", "VQTokenizer"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class VQConfig(JsonConfig):
    """Architecture of the taming VQGAN as diffusers sees it.

    ``block_out_channels[i]`` = taming ``ch * ch_mult[i]``; level i works at ``resolution / 2**i`` and
    gets self-attention when that is in ``attn_resolutions``; ``latent_channels`` = ``z_channels``,
    ``vq_embed_dim`` = ``embed_dim``, ``num_vq_embeddings`` = ``n_embed``, ``layers_per_block`` =
    ``num_res_blocks``.
    """

    block_out_channels: tuple = (128, 128, 256, 512)
    layers_per_block: int = 2
    latent_channels: int = 256
    num_vq_embeddings: int = 8192
    vq_embed_dim: int = 256
    norm_num_groups: int = 32
    resolution: int = 256
    attn_resolutions: tuple = (32,)
    in_channels: int = 3
    out_channels: int = 3

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        if self.resolution % self.downsample_factor:
            raise ValueError(f"resolution {self.resolution} is not divisible by the downsampling factor {self.downsample_factor}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def grid(self) -> int:
        """Tokens per side: ``resolution / downsample_factor``."""
        return self.resolution // self.downsample_factor

    def block_types(self) -> tuple:
        """(down_block_types, up_block_types) for ``diffusers.VQModel``."""
        attn = [self.resolution // 2**i in self.attn_resolutions for i in range(len(self.block_out_channels))]
        down = tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn)
        up = tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn))
        return down, up


class VQTokenizer(nn.Module):
    """Image <-> VQ code ids (module docstring has the formulas). Always float32."""

    def __init__(self, config: VQConfig | dict | None = None):
        super().__init__()
        config = VQConfig() if config is None else config
        self.config = VQConfig.from_dict(config) if isinstance(config, dict) else config
        down, up = self.config.block_types()
        c = self.config
        self.model = VQModel(
            in_channels=c.in_channels, out_channels=c.out_channels, down_block_types=down, up_block_types=up,
            block_out_channels=c.block_out_channels, layers_per_block=c.layers_per_block,
            latent_channels=c.latent_channels, num_vq_embeddings=c.num_vq_embeddings, vq_embed_dim=c.vq_embed_dim,
            norm_num_groups=c.norm_num_groups, sample_size=c.resolution, lookup_from_codebook=True,
        )
        self.proj = nn.Conv2d(c.vq_embed_dim, c.num_vq_embeddings, 1)
        self.requires_grad_(False)
        self.eval()

    @property
    def num_tokens(self) -> int:
        return self.config.grid**2

    # ---- tensors ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, R, R] in [-1, 1] -> code ids [B, g*g] (int64, row-major)."""
        r = self.config.resolution
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (self.config.in_channels, r, r):
            raise ValueError(f"expected images [B, {self.config.in_channels}, {r}, {r}], got {tuple(pixels.shape)}")
        h = self.model.encode(pixels.to(self.proj.weight)).latents
        return self.proj(h).argmax(dim=1).flatten(1)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Code ids [B, g*g] -> images [B, 3, R, R] (about [-1, 1], not clamped)."""
        g, n = self.config.grid, self.config.num_vq_embeddings
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.proj.weight.device)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.shape[1] != g * g:
            raise ValueError(f"expected {g * g} code ids per image, got {ids.shape[1]}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= n):
            raise ValueError(f"code ids must lie in [0, {n})")
        shape = (ids.shape[0], g, g, self.config.vq_embed_dim)
        return self.model.decode(ids.reshape(-1), force_not_quantize=True, shape=shape).sample

    # ---- images -------------------------------------------------------------------------------

    def preprocess(self, images) -> torch.Tensor:
        """PIL image(s) -> [B, 3, R, R] in [-1, 1]: RGB, resized to R x R (Lanczos, as the release's
        ``img2idx``), ``x = 2 * pixel / 255 - 1``."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        r = self.config.resolution
        arrays = [np.asarray(im.convert("RGB").resize((r, r), Image.LANCZOS), dtype=np.float32) for im in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0

    @staticmethod
    def postprocess(pixels: torch.Tensor) -> list:
        """[B, 3, R, R] in [-1, 1] -> PIL RGB images: ``round(255 * (clamp(x, -1, 1) + 1) / 2)``."""
        x = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).cpu().numpy()]

    def encode_images(self, images) -> torch.Tensor:
        return self.encode(self.preprocess(images))

    def decode_images(self, ids) -> list:
        return self.postprocess(self.decode(ids))

    # ---- files --------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """``config.json`` + ``model.safetensors`` in ``directory`` (each replaced atomically)."""
        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        atomic_write(os.path.join(directory, WEIGHTS_FILE), lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        text = json.dumps(self.config.to_dict(), indent=2)
        atomic_write(os.path.join(directory, CONFIG_FILE), text)
        return str(directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "VQTokenizer":
        cfg_path, weights = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
        for p in (cfg_path, weights):
            if not os.path.isfile(p):
                raise FileNotFoundError(
                    f"{p} does not exist: an image tokenizer directory holds {CONFIG_FILE} and {WEIGHTS_FILE} "
                    f"(write one from taming's last.ckpt + model.yaml with `healthgpt convert-vqgan`)"
                )
        with open(cfg_path) as f:
            tok = cls(VQConfig.from_dict(json.load(f)))
        tok.load_state_dict(load_file(weights), strict=True)
        return tok
