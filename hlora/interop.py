"""PEFT LoRA adapter directories: imported as a k = 1 plugin (``from_peft``) and a k = 1 plugin
exported as one (``to_peft``), with the same outputs as PEFT's."""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .checked import CheckpointError
from .config import HLoRAConfig, PluginConfig
from .files import atomic_write
from .io import load_plugin_state
from .model import find_modules_to_save, get_config, named_adapter_layers

__all__ = ["from_peft", "to_peft"]

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


def _lora_factors(plugin: nn.Module, name: str) -> tuple:
    """(A [r, d_in], B [d_out, r]) of a plugin whose update is exactly ``scale * B A``."""
    if getattr(plugin, "num_experts", 1) != 1:
        raise ValueError(f"plugin {name!r} has {plugin.num_experts} experts: its per-token softmax mixture is not a "
                         f"LoRA update, so only k = 1 plugins export to PEFT")
    holder = plugin.experts[0] if hasattr(plugin, "experts") else plugin
    return holder.A, holder.B


def _peft_targets(model: nn.Module, paths: list) -> list:
    """PEFT's ``target_modules``: the leaf names (``q_proj``) when they pick exactly ``paths`` in
    ``model``, as serving stacks expect; else the full paths."""
    leaves = {p.rpartition(".")[2] for p in paths}
    adapted = {n for n, _ in named_adapter_layers(model)}
    picked = {n for n, m in model.named_modules()
              if n.rpartition(".")[2] in leaves and not any(n.startswith(a + ".") for a in adapted)}
    return sorted(leaves) if picked == set(paths) else sorted(paths)


def to_peft(model: nn.Module, plugin: str, adapter_dir: str | os.PathLike, use_rslora: bool = False,
            task_type: str | None = None) -> str:
    """Write plugin ``plugin`` (one expert, or the ``lora`` variant) as a PEFT LoRA adapter directory:
    ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's key names
    (``base_model.model.<path>.lora_A.weight`` [r, d_in], ``.lora_B.weight`` [d_out, r]), the inverse of
    ``from_peft``; ``PeftModel.from_pretrained`` on the same base then computes what this model
    computes routed to ``plugin`` (in eval; PEFT drops out x where H-LoRA drops out rank space).

    PEFT's scale is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), so
    ``lora_alpha`` is written as the plugin's scale times r (or sqrt(r)). The config's
    ``modules_to_save`` go along (PEFT saves them under their own paths). ``task_type``: PEFT's;
    by default ``CAUSAL_LM`` for a ``...ForCausalLM`` model, else none. Returns the directory.
    """
    config = get_config(model)
    if config is None:
        raise RuntimeError(f"{type(model).__name__} has no hlora plugins to export")
    if plugin not in config.plugins:
        raise ValueError(f"unknown plugin {plugin!r}; this model's plugins are {config.plugin_names}")
    tensors, paths, fan_in_fan_out = {}, [], set()
    for path, layer in named_adapter_layers(model):
        if plugin in layer.plugins:
            A, B = _lora_factors(layer.plugins[plugin], plugin)
            tensors[f"{_PREFIX}{path}.lora_A.weight"] = A.detach().contiguous().cpu().clone()
            tensors[f"{_PREFIX}{path}.lora_B.weight"] = B.detach().contiguous().cpu().clone()
            paths.append(path)
            fan_in_fan_out.add(layer.fan_in_fan_out)
    for path in find_modules_to_save(model, config):
        for key, t in model.get_submodule(path).state_dict().items():
            tensors[f"{_PREFIX}{path}.{key}"] = t.detach().contiguous().cpu().clone()
    r = config.plugins[plugin].rank
    scale = config.plugins[plugin].scale
    if task_type is None and type(model).__name__.endswith("ForCausalLM"):
        task_type = "CAUSAL_LM"
    peft_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "name_or_path", None) or None,
        "r": r,
        "lora_alpha": scale * (math.sqrt(r) if use_rslora else r),
        "use_rslora": bool(use_rslora),
        "target_modules": _peft_targets(model, paths),
        "lora_dropout": config.plugins[plugin].dropout,
        "fan_in_fan_out": fan_in_fan_out == {True},
        "bias": "none",
        "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    os.makedirs(adapter_dir, exist_ok=True)
    atomic_write(os.path.join(adapter_dir, "adapter_model.safetensors"),
                 lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(os.path.join(adapter_dir, "adapter_config.json"), json.dumps(peft_config, indent=2, sort_keys=True))
    return str(adapter_dir)
