"""The VQ image tokenizer and the taming checkpoint converter.

The converter is checked against a direct reimplementation of taming-transformers' Gumbel VQGAN
layout (``taming/modules/diffusionmodules/model.py``: Encoder, Decoder, ResnetBlock, AttnBlock,
Downsample, Upsample; ``GumbelQuantize``'s ``proj`` and ``embed``), built at tiny sizes with random
weights: its state dict (taming key names) goes through a real ``last.ckpt`` + ``model.yaml``.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from healthgpt import VQConfig, VQTokenizer, convert_taming_checkpoint
from healthgpt.model.vq_convert import ConversionError


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- taming's layout, reimplemented --------------------------------------------------------------


def Normalize(c):
    return nn.GroupNorm(num_groups=32, num_channels=c, eps=1e-6, affine=True)


def swish(x):
    return x * torch.sigmoid(x)


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = Normalize(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = Normalize(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1, 1, 0)

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = Normalize(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        q = q.reshape(b, c, hh * ww).permute(0, 2, 1)
        w = torch.softmax(torch.bmm(q, k.reshape(b, c, hh * ww)) * c**-0.5, dim=2)
        h = torch.bmm(v.reshape(b, c, hh * ww), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(h)


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, in_channels, resolution, z_channels):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        res, in_mult = resolution, (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for i in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            cin, cout = ch * in_mult[i], ch * ch_mult[i]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(cin, cout))
                cin = cout
                if res in attn_resolutions:
                    attn.append(AttnBlock(cin))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i != self.num_resolutions - 1:
                down.downsample = Downsample(cin)
                res //= 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = ResnetBlock(cin, cin), AttnBlock(cin), ResnetBlock(cin, cin)
        self.norm_out, self.conv_out = Normalize(cin), nn.Conv2d(cin, z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for i, down in enumerate(self.down):
            for j in range(self.num_res_blocks):
                h = down.block[j](h)
                if len(down.attn):
                    h = down.attn[j](h)
            if i != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        cin = ch * ch_mult[-1]
        res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, cin, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = ResnetBlock(cin, cin), AttnBlock(cin), ResnetBlock(cin, cin)
        self.up = nn.ModuleList()
        for i in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            cout = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(cin, cout))
                cin = cout
                if res in attn_resolutions:
                    attn.append(AttnBlock(cin))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i != 0:
                up.upsample = Upsample(cin)
                res *= 2
            self.up.insert(0, up)
        self.norm_out, self.conv_out = Normalize(cin), nn.Conv2d(cin, out_ch, 3, 1, 1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i in reversed(range(self.num_resolutions)):
            for j in range(self.num_res_blocks + 1):
                h = self.up[i].block[j](h)
                if len(self.up[i].attn):
                    h = self.up[i].attn[j](h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class GumbelQuantize(nn.Module):
    def __init__(self, num_hiddens, embedding_dim, n_embed):
        super().__init__()
        self.proj = nn.Conv2d(num_hiddens, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embedding_dim)


class TamingGumbelVQ(nn.Module):
    def __init__(self, dd, n_embed, embed_dim):
        super().__init__()
        kw = dict(ch=dd["ch"], ch_mult=dd["ch_mult"], num_res_blocks=dd["num_res_blocks"],
                  attn_resolutions=dd["attn_resolutions"], resolution=dd["resolution"], z_channels=dd["z_channels"])
        self.encoder = Encoder(in_channels=dd["in_channels"], **kw)
        self.decoder = Decoder(out_ch=dd["out_ch"], **kw)
        self.quantize = GumbelQuantize(dd["z_channels"], embed_dim, n_embed)
        self.quant_conv = nn.Conv2d(dd["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, dd["z_channels"], 1)

    def logits(self, x):
        return self.quantize.proj(self.quant_conv(self.encoder(x)))

    def decode_code(self, ids, g):  # taming's get_codebook_entry: one-hot @ embed, then decode
        one_hot = F.one_hot(ids.reshape(-1, g, g), self.quantize.embed.num_embeddings).permute(0, 3, 1, 2).float()
        z_q = torch.einsum("bnhw,nd->bdhw", one_hot, self.quantize.embed.weight)
        return self.decoder(self.post_quant_conv(z_q))


DD = dict(double_z=False, z_channels=32, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
          num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
YAML = {"model": {"base_learning_rate": 4.5e-6, "target": "taming.models.vqgan.GumbelVQ",
                  "params": {"kl_weight": 1e-8, "embed_dim": 32, "n_embed": 64, "monitor": "val/rec_loss",
                             "temperature_scheduler_config": {"target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler"},
                             "ddconfig": DD, "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"}}}}


@pytest.fixture(scope="module")
def taming(tmp_path_factory):
    torch.manual_seed(0)
    ref = TamingGumbelVQ(DD, n_embed=64, embed_dim=32).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # norms and biases away from their 1 / 0 init
    state = dict(ref.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)  # training-only keys are dropped
    d = tmp_path_factory.mktemp("taming")
    torch.save({"state_dict": state, "global_step": 1}, d / "last.ckpt")
    (d / "model.yaml").write_text(yaml.safe_dump(YAML))
    return ref, d


def test_converted_checkpoint_matches_taming(taming, tmp_path):
    ref, d = taming
    tok = convert_taming_checkpoint(str(d / "last.ckpt"), str(d / "model.yaml"), str(tmp_path / "vq"))
    cfg = tok.config
    assert cfg.block_out_channels == (32, 64, 64) and cfg.grid == 8 and cfg.num_vq_embeddings == 64
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        want_logits = ref.logits(x)
        got_logits = tok.proj(tok.model.encode(x).latents)
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
        ids = tok.encode(x)
        assert ids.shape == (2, 64) and torch.equal(ids, want_logits.argmax(1).flatten(1))
        torch.testing.assert_close(tok.decode(ids), ref.decode_code(ids, 8), rtol=1e-4, atol=1e-4)
    again = VQTokenizer.from_pretrained(tmp_path / "vq")
    assert torch.equal(again.encode(x), ids)


def test_converter_errors(taming, tmp_path):
    ref, d = taming
    state = dict(ref.state_dict())
    bad = dict(state, **{"encoder.extra.weight": torch.zeros(1)})
    torch.save({"state_dict": bad}, tmp_path / "extra.ckpt")
    with pytest.raises(ConversionError, match="encoder.extra.weight"):
        convert_taming_checkpoint(str(tmp_path / "extra.ckpt"), str(d / "model.yaml"))
    missing = {k: v for k, v in state.items() if k != "decoder.mid.attn_1.q.weight"}
    torch.save({"state_dict": missing}, tmp_path / "missing.ckpt")
    with pytest.raises(ConversionError, match="missing.*mid_block.attentions.0.to_q.weight"):
        convert_taming_checkpoint(str(tmp_path / "missing.ckpt"), str(d / "model.yaml"))
    plain = {"model": dict(YAML["model"], target="taming.models.vqgan.VQModel")}
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(plain))
    with pytest.raises(ConversionError, match="GumbelVQ"):
        convert_taming_checkpoint(str(d / "last.ckpt"), str(tmp_path / "plain.yaml"))
    with pytest.raises(FileNotFoundError, match="taming checkpoint"):
        convert_taming_checkpoint(str(tmp_path / "nope.ckpt"), str(d / "model.yaml"))


def test_openimages_f8_layout_and_image_round_trip():
    cfg = VQConfig()  # the released tokenizer: f=8, 8192 codes, attention at 32
    assert cfg.grid == 32 and cfg.block_types() == (
        ("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
        ("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
    )
    from healthgpt.model.config import TINY_VQ
    from PIL import Image

    torch.manual_seed(0)
    tok = VQTokenizer(TINY_VQ)
    img = Image.new("RGB", (300, 200), (200, 30, 90))
    ids = tok.encode_images([img])
    assert ids.shape == (1, 1024) and ids.dtype == torch.long and tok.num_tokens == 1024
    out = tok.decode_images(ids)
    assert out[0].size == (256, 256) and out[0].mode == "RGB"
    with pytest.raises(ValueError, match="1024 code ids"):
        tok.decode(torch.zeros(1, 100, dtype=torch.long))
    with pytest.raises(ValueError, match="code ids must lie"):
        tok.decode(torch.full((1, 1024), 8192))
