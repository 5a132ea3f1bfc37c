"""taming-transformers Gumbel VQGAN checkpoint (``last.ckpt`` + ``model.yaml``) -> ``VQTokenizer``.

Key renames (taming -> ours; L = number of resolution levels)::

    {enc,dec}oder.conv_in / conv_out             -> model.{enc,dec}oder.conv_in / conv_out
    {enc,dec}oder.norm_out                       -> model.{enc,dec}oder.conv_norm_out
    {enc,dec}oder.mid.block_1 / block_2          -> model.{enc,dec}oder.mid_block.resnets.0 / 1
    {enc,dec}oder.mid.attn_1                     -> model.{enc,dec}oder.mid_block.attentions.0
    encoder.down.i.block.j / attn.j              -> model.encoder.down_blocks.i.resnets.j / attentions.j
    encoder.down.i.downsample.conv               -> model.encoder.down_blocks.i.downsamplers.0.conv
    decoder.up.k.block.j / attn.j                -> model.decoder.up_blocks.(L-1-k).resnets.j / attentions.j
    decoder.up.k.upsample.conv                   -> model.decoder.up_blocks.(L-1-k).upsamplers.0.conv
    resnet nin_shortcut                          -> conv_shortcut
    attention norm / q / k / v / proj_out (1x1)  -> group_norm / to_q / to_k / to_v / to_out.0 (linear)
    quant_conv, post_quant_conv                  -> model.quant_conv, model.post_quant_conv
    quantize.embed                               -> model.quantize.embedding
    quantize.proj                                -> proj
    loss.*                                       -> dropped (discriminator and LPIPS, training only)
"""

from __future__ import annotations

import re

import torch
import yaml
from hlora import CheckpointError, copy_checked

from healthgpt.model.files import require_file
from healthgpt.model.vq import VQConfig, VQTokenizer

__all__ = ["convert_taming_checkpoint", "taming_config", "taming_state_dict_to_ours", "ConversionError"]


class ConversionError(ValueError):
    """A taming checkpoint or config this converter cannot map; the message says what and where."""


_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_MID = {"block_1": "resnets.0", "block_2": "resnets.1", "attn_1": "attentions.0"}


def taming_config(yaml_text: str) -> VQConfig:
    """The ``VQConfig`` of a taming ``model.yaml`` (GumbelVQ only)."""
    cfg = yaml.safe_load(yaml_text)
    try:
        model = cfg["model"]
        target, params = model["target"], model["params"]
        dd = params["ddconfig"]
    except (KeyError, TypeError) as e:
        raise ConversionError(f"model.yaml lacks {e}: expected model.target, model.params.ddconfig") from None
    if not str(target).endswith("GumbelVQ"):
        raise ConversionError(
            f"model.target is {target!r}; only taming.models.vqgan.GumbelVQ (the f=8, 8192 Gumbel VQGAN) is supported"
        )
    if dd.get("double_z", False):
        raise ConversionError("ddconfig.double_z is true: that is a KL autoencoder, not a VQGAN")
    if int(dd["z_channels"]) != int(params["embed_dim"]):
        raise ConversionError(
            f"z_channels {dd['z_channels']} != embed_dim {params['embed_dim']}: taming applies the Gumbel projection "
            f"(declared on z_channels) to quant_conv's embed_dim output, so they must agree"
        )
    return VQConfig(
        block_out_channels=tuple(int(dd["ch"]) * int(m) for m in dd["ch_mult"]),
        layers_per_block=int(dd["num_res_blocks"]),
        latent_channels=int(dd["z_channels"]),
        num_vq_embeddings=int(params["n_embed"]),
        vq_embed_dim=int(params["embed_dim"]),
        norm_num_groups=32,  # taming's Normalize is GroupNorm(32, C)
        resolution=int(dd["resolution"]),
        attn_resolutions=tuple(int(r) for r in dd.get("attn_resolutions", ())),
        in_channels=int(dd.get("in_channels", 3)),
        out_channels=int(dd.get("out_ch", 3)),
    )


def _rename(key: str, levels: int) -> str | None:
    """One taming key -> ours; ``None`` for keys to drop; ``ConversionError`` for unknown ones."""
    if key.startswith("loss."):
        return None
    simple = {
        "quantize.embed.weight": "model.quantize.embedding.weight",
        "quantize.proj.weight": "proj.weight",
        "quantize.proj.bias": "proj.bias",
    }
    if key in simple:
        return simple[key]
    m = re.fullmatch(r"(quant_conv|post_quant_conv)\.(weight|bias)", key)
    if m:
        return f"model.{key}"
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if not m:
        raise ConversionError(f"unknown taming key {key!r}")
    part, rest = m.groups()
    rest = re.sub(r"\bnin_shortcut\b", "conv_shortcut", rest)
    rest = re.sub(r"^norm_out\.", "conv_norm_out.", rest)
    mm = re.fullmatch(r"mid\.(block_1|block_2|attn_1)\.(.+)", rest)
    if mm:
        rest = f"mid_block.{_MID[mm.group(1)]}.{mm.group(2)}"
    mm = re.fullmatch(r"(down|up)\.(\d+)\.(block|attn|downsample|upsample)\.(.+)", rest)
    if mm:
        kind, level, sub, tail = mm.groups()
        level = int(level) if kind == "down" else levels - 1 - int(level)
        blocks = "down_blocks" if kind == "down" else "up_blocks"
        if sub == "block":
            rest = f"{blocks}.{level}.resnets.{tail}"
        elif sub == "attn":
            rest = f"{blocks}.{level}.attentions.{tail}"
        else:
            rest = f"{blocks}.{level}.{sub}rs.0.{tail}"  # downsamplers / upsamplers
    ma = re.fullmatch(r"(.+\.attentions\.\d+)\.(norm|q|k|v|proj_out)\.(weight|bias)", rest)
    if ma:
        rest = f"{ma.group(1)}.{_ATTN[ma.group(2)]}.{ma.group(3)}"
    return f"model.{part}.{rest}"


def taming_state_dict_to_ours(state: dict, config: VQConfig) -> dict:
    """Rename a taming GumbelVQ state dict to ``VQTokenizer`` keys; attention 1x1 conv weights
    [C, C, 1, 1] become linear weights [C, C]."""
    levels = len(config.block_out_channels)
    out, unknown = {}, []
    for key, value in state.items():
        try:
            new = _rename(key, levels)
        except ConversionError:
            unknown.append(key)
            continue
        if new is None:
            continue
        if re.search(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$", new) and value.dim() == 4:
            value = value.reshape(value.shape[0], value.shape[1])
        out[new] = value
    if unknown:
        raise ConversionError(f"{len(unknown)} taming keys have no counterpart: {', '.join(unknown[:10])}")
    return out


def convert_taming_checkpoint(ckpt_path: str, yaml_path: str, out_dir: str | None = None, trust_pickle: bool = False) -> VQTokenizer:
    """Read taming's ``last.ckpt`` (+ ``model.yaml``), check every key and shape, return the
    ``VQTokenizer`` and, with ``out_dir``, save it there.

    The checkpoint is read with ``torch.load(weights_only=True)``; a Lightning checkpoint holding
    other pickled objects needs ``trust_pickle=True`` (only for files from a trusted source).
    """
    require_file(ckpt_path, "taming checkpoint")
    require_file(yaml_path, "taming model.yaml")
    with open(yaml_path) as f:
        config = taming_config(f.read())
    try:
        raw = torch.load(ckpt_path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:  # pickle.UnpicklingError and friends: say what to do
        raise ConversionError(
            f"cannot read {ckpt_path} with torch.load(weights_only={not trust_pickle}): {e}. "
            f"If the file comes from a trusted source, retry with trust_pickle=True (--trust-pickle)"
        ) from e
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise ConversionError(f"{ckpt_path} holds no state dict (expected a Lightning checkpoint with 'state_dict')")
    ours = taming_state_dict_to_ours(state, config)
    tok = VQTokenizer(config)
    try:
        copy_checked(tok.state_dict(keep_vars=True), ours, what=f"{ckpt_path} (it does not match its model.yaml)")
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    if out_dir is not None:
        tok.save_pretrained(out_dir)
    return tok
