"""Importing a PEFT LoRA adapter directory as a k = 1 plugin (same outputs as PEFT's)."""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn as nn
from safetensors.torch import load_file

from .checked import CheckpointError
from .config import HLoRAConfig, PluginConfig
from .io import load_plugin_state

__all__ = ["from_peft"]

_PREFIX = "base_model.model."
_UNSUPPORTED = {  # PEFT options whose computation a k = 1 H-LoRA plugin cannot reproduce
    "use_dora": False,
    "lora_bias": False,
    "bias": "none",
    "rank_pattern": {},
    "alpha_pattern": {},
    "layer_replication": None,
    "target_parameters": None,
}


def from_peft(model: nn.Module, adapter_dir: str | os.PathLike, plugin: str = "default") -> nn.Module:
    """Inject ``adapter_dir`` (``adapter_config.json`` + ``adapter_model.safetensors``, as PEFT's
    ``save_pretrained`` writes them) into ``model`` as plugin ``plugin`` with one expert.

    The scale is PEFT's ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA). In eval the outputs are
    PEFT's; in training note that PEFT drops out x, while H-LoRA drops out the rank-space values.
    """
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    weights_path = os.path.join(adapter_dir, "adapter_model.safetensors")
    for p in (cfg_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} not found: a PEFT adapter directory holds adapter_config.json and adapter_model.safetensors")
    with open(cfg_path) as f:
        peft_cfg = json.load(f)
    if peft_cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {peft_cfg.get('peft_type')!r} is not LORA")
    for key, default in _UNSUPPORTED.items():
        if peft_cfg.get(key, default) not in (default, None, {}, False):
            raise ValueError(f"{cfg_path}: {key}={peft_cfg[key]!r} has no H-LoRA equivalent")

    r, lora_alpha = int(peft_cfg["r"]), float(peft_cfg["lora_alpha"])
    scale = lora_alpha / math.sqrt(r) if peft_cfg.get("use_rslora") else lora_alpha / r
    raw = load_file(weights_path)
    tensors, targets, saved_modules = {}, [], set()
    for key, t in raw.items():
        if not key.startswith(_PREFIX):
            raise CheckpointError(f"{weights_path}: key {key!r} lacks PEFT's {_PREFIX!r} prefix")
        key = key[len(_PREFIX) :]
        for part, ours in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):
            if key.endswith(part):
                path = key[: -len(part)]
                tensors[f"{path}.plugins.{plugin}.{ours}"] = t
                if ours == "A":
                    targets.append(path)
                    tensors[f"{path}.plugins.{plugin}.router"] = torch.zeros(1, t.shape[1], dtype=t.dtype)
                break
        else:  # a modules_to_save entry: PEFT saves it under the module's own path
            tensors[key] = t
            saved_modules.add(key.rpartition(".")[0])
    if not targets:
        raise CheckpointError(f"{weights_path} holds no lora_A weights")
    config = HLoRAConfig(
        plugins={plugin: PluginConfig(rank=r, num_experts=1, alpha=scale * r, dropout=float(peft_cfg.get("lora_dropout", 0.0)))},
        target_modules=sorted(targets),
        modules_to_save=sorted(saved_modules) or None,
    )
    return load_plugin_state(model, config, tensors, strict=True, source=str(adapter_dir))
