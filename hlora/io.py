"""Saving and loading plugins as ``hlora_config.json`` + ``hlora_model.safetensors``.

The safetensors file also carries the config in its metadata, so the one file that is replaced
atomically is a complete checkpoint on its own: a crash mid-save leaves the previous file whole.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checked import CheckpointError, copy_checked
from .config import HLoRAConfig
from .files import atomic_write
from .model import (
    adapter_layers,
    add_plugin,
    delete_plugin,
    find_modules_to_save,
    get_config,
    get_task,
    inject,
    named_adapter_layers,
    set_task,
    unload,
)

__all__ = ["save", "load", "load_plugin_state", "WEIGHTS_NAME", "plugin_state_dict", "read_safetensors"]

WEIGHTS_NAME = "hlora_model.safetensors"
_META_KEY = "hlora_config"


def _subset(config: HLoRAConfig, plugins) -> HLoRAConfig:
    if plugins is None:
        return config
    unknown = [p for p in plugins if p not in config.plugins]
    if unknown:
        raise CheckpointError(f"unknown plugin(s) {unknown}; available: {config.plugin_names}")
    data = config.to_dict()
    data["plugins"] = {n: data["plugins"][n] for n in config.plugin_names if n in plugins}
    data["plugin_targets"] = {n: t for n, t in (config.plugin_targets or {}).items() if n in plugins} or None
    return HLoRAConfig.from_dict(data)


def _renamed(config: HLoRAConfig, tensors: dict, rename: dict) -> tuple:
    """The config and tensors with plugin ``old`` called ``rename[old]``."""
    unknown = [old for old in rename if old not in config.plugins]
    if unknown:
        raise CheckpointError(f"rename names plugin(s) {unknown} that are not being loaded; loading {config.plugin_names}")
    names = [rename.get(n, n) for n in config.plugin_names]
    if len(set(names)) != len(names):
        raise CheckpointError(f"rename {rename} gives two loaded plugins the same name: {names}")
    data = config.to_dict()
    data["plugins"] = {rename.get(n, n): p for n, p in data["plugins"].items()}
    data["plugin_targets"] = {rename.get(n, n): t for n, t in (data["plugin_targets"] or {}).items()} or None
    marks = {f".plugins.{old}.": f".plugins.{new}." for old, new in rename.items()}
    renamed = {}
    for key, t in tensors.items():
        for mark, new_mark in marks.items():
            if mark in key:
                key = key.replace(mark, new_mark, 1)
                break
        renamed[key] = t
    return HLoRAConfig.from_dict(data), renamed  # from_dict checks the new names


def plugin_state_dict(model: nn.Module, plugins=None) -> dict:
    """name -> tensor of the given plugins' parameters plus the config's ``modules_to_save``."""
    config = get_config(model)
    if config is None:
        raise RuntimeError(f"{type(model).__name__} has no hlora plugins to save")
    names = set(_subset(config, plugins).plugin_names)
    state = {}
    for path, layer in named_adapter_layers(model):
        for pname, plugin in layer.plugins.items():
            if pname in names:
                for key, t in plugin.state_dict().items():
                    state[f"{path}.plugins.{pname}.{key}"] = t
    for path in find_modules_to_save(model, config):
        for key, t in model.get_submodule(path).state_dict().items():
            state[f"{path}.{key}"] = t
    return state


def save(model: nn.Module, path: str | os.PathLike, plugins=None) -> str:
    """Write the plugins (all, or the named ones) and ``modules_to_save`` to directory ``path``."""
    config = get_config(model)
    if config is None:
        raise RuntimeError(f"{type(model).__name__} has no hlora plugins to save")
    sub = _subset(config, plugins)
    os.makedirs(path, exist_ok=True)
    # safetensors refuses tensors that share memory (tied embeddings): save contiguous copies
    state = {k: v.detach().contiguous().clone() for k, v in plugin_state_dict(model, plugins).items()}
    meta = {_META_KEY: sub.to_json(), "format": "pt"}
    atomic_write(os.path.join(path, WEIGHTS_NAME), lambda tmp: save_file(state, tmp, metadata=meta))
    sub.save(path)
    return str(path)


def read_safetensors(path: str | os.PathLike) -> tuple:
    """-> ``(name -> tensor, metadata)`` of a safetensors file; an empty, truncated or foreign file
    raises ``CheckpointError`` naming it (not the library's own error)."""
    path = os.fspath(path)
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (an interrupted copy or save?)")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def _read_checkpoint(path) -> tuple:
    weights = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path!s}: not an hlora checkpoint directory")
    tensors, meta = read_safetensors(weights)
    try:
        config = HLoRAConfig.from_json(meta[_META_KEY]) if _META_KEY in meta else HLoRAConfig.load(path)
    except ValueError as e:  # json.JSONDecodeError included: a damaged config
        raise CheckpointError(f"{weights}: unreadable hlora config: {e}") from None
    return config, tensors


def _compatible(have: HLoRAConfig, want: HLoRAConfig) -> None:
    if have.variant != want.variant:
        raise CheckpointError(f"checkpoint variant {want.variant!r} does not match the model's {have.variant!r}")
    for name, cfg in want.plugins.items():
        if name not in have.plugins:
            raise CheckpointError(
                f"checkpoint plugin {name!r} is not in the model (plugins {have.plugin_names}); "
                f"load into a model without plugins to inject the checkpoint's config"
            )
        # dropout is a training choice, not part of the weights: the model's own setting stays
        if replace(have.plugins[name], dropout=0.0) != replace(cfg, dropout=0.0):
            raise CheckpointError(f"plugin {name!r}: checkpoint config {cfg} differs from the model's {have.plugins[name]}")


def load(model: nn.Module, path: str | os.PathLike, plugins=None, rename: dict | None = None,
         strict: bool = True) -> nn.Module:
    """Load a checkpoint saved by ``save``: all its plugins or the named ``plugins``, each under
    ``rename.get(name, name)``.

    Into a model without plugins: injects the (selected, renamed) checkpoint config, everything
    trainable as ``inject`` leaves it. Into an injected model: plugins it already holds (same
    variant and config) get the checkpoint's values; the others are added (``add_plugin`` at the
    checkpoint's module paths), frozen; other ``requires_grad`` flags and the task stay.

    Every key, shape and dtype is checked before any value is copied (``hlora.copy_checked``); on
    any error the model is left exactly as it was (plugins added or an injection done here are
    undone, config and ``requires_grad`` restored). ``strict=False`` tolerates missing and
    unexpected keys but never a shape mismatch.
    """
    ckpt_config, tensors = _read_checkpoint(path)
    wanted = _subset(ckpt_config, plugins)
    prefixes = tuple(f".plugins.{n}." for n in ckpt_config.plugin_names if n not in wanted.plugins)
    tensors = {k: v for k, v in tensors.items() if not any(p in k for p in prefixes)}
    if rename:
        wanted, tensors = _renamed(wanted, tensors, rename)
    return load_plugin_state(model, wanted, tensors, strict=strict, source=str(path))


def _checkpoint_paths(config: HLoRAConfig, tensors: dict, name: str):
    """Where the checkpoint puts plugin ``name``: the paths its tensors name (else its config's)."""
    mark = f".plugins.{name}."
    paths = sorted({k.split(mark, 1)[0] for k in tensors if mark in k})
    return paths or (config.plugin_targets or {}).get(name) or config.target_modules


def _add_checkpoint_plugins(model: nn.Module, config: HLoRAConfig, tensors: dict) -> list:
    """Add (frozen) the plugins of ``config`` the injected ``model`` lacks; -> their names."""
    have = get_config(model)
    if have.variant != config.variant:
        raise CheckpointError(f"checkpoint variant {config.variant!r} does not match the model's {have.variant!r}")
    if any(layer.merged is not None for _, layer in named_adapter_layers(model)):
        raise CheckpointError("cannot load plugins while one is merged into the base weights; call hlora.unmerge(model) first")
    added = []
    for name in config.plugin_names:
        if name not in have.plugins:
            add_plugin(model, name, config.plugins[name], _checkpoint_paths(config, tensors, name), freeze_existing=False)
            added.append(name)
            for layer in adapter_layers(model):
                if name in layer.plugins:
                    layer.plugins[name].requires_grad_(False)
    return added


@torch.no_grad()
def load_plugin_state(model: nn.Module, config: HLoRAConfig, tensors: dict, strict: bool = True, source: str = "state dict"):
    """Copy ``tensors`` (keys as ``plugin_state_dict`` names them) into ``model``, injecting ``config``
    first when the model has no plugins; all-or-nothing as ``load`` describes."""
    injected_here = get_config(model) is None
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    if injected_here:
        inject(model, config)
    else:
        have = get_config(model)
        before = (dict(have.plugins), have.plugin_targets, get_task(model))
    added = []
    try:
        if not injected_here:
            added = _add_checkpoint_plugins(model, config, tensors)
        _compatible(get_config(model), config)
        copy_checked(plugin_state_dict(model, config.plugin_names), tensors, strict=strict,
                     what=f"{source} into {type(model).__name__}")
    except BaseException:
        if injected_here:
            unload(model)
        else:
            for name in reversed(added):
                delete_plugin(model, name)
            have.plugins, have.plugin_targets = before[0], before[1]
            set_task(model, before[2])
        for n, p in model.named_parameters():
            p.requires_grad_(requires_grad[n])
        raise
    return model
