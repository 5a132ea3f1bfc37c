"""Patching a model: find the target modules, swap in adapter layers, route tasks, train, merge."""

from __future__ import annotations

import contextlib
import re
from dataclasses import replace
from typing import Iterator, Sequence, Union

import torch
import torch.nn as nn

from .config import HLoRAConfig, TargetSpec
from .layer import LAYER_CLASSES, AdapterLayer, is_adaptable
from .quantized import quantized_layer_class
from .routing import Routing

__all__ = [
    "inject",
    "unload",
    "adapter_layers",
    "named_adapter_layers",
    "get_config",
    "set_task",
    "get_task",
    "task",
    "set_trainable",
    "set_dropout",
    "trainable_parameters",
    "print_trainable_parameters",
    "merge",
    "unmerge",
    "find_targets",
    "find_modules_to_save",
    "plugin_layout",
    "add_plugin",
    "delete_plugin",
]

Task = Union[None, str, Sequence, torch.Tensor]

_CONFIG_ATTR = "hlora_config"
_TASK_ATTR = "_hlora_task"


# ---- finding targets ------------------------------------------------------------------------------


def _name_matches(name: str, spec) -> bool:
    """List: exact name or ``.``-suffix match. String: regex full match on the module path."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def _output_head_names(model: nn.Module) -> set:
    names = set()
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    for name, module in model.named_modules():
        if module is head or name == "lm_head" or name.endswith(".lm_head"):
            names.add(name)
    return names


def find_targets(model: nn.Module, config: HLoRAConfig) -> list:
    """Module paths that ``config`` adapts in ``model``; an error listing a few names if none."""
    heads = _output_head_names(model)
    targets, seen = [], []
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer) or not name:
            continue
        if is_adaptable(module):
            seen.append(name)
        if config.target_modules == "all-linear":
            chosen = is_adaptable(module) and name not in heads
        else:
            chosen = _name_matches(name, config.target_modules)
        if not chosen:
            continue
        if config.exclude_modules and _name_matches(name, config.exclude_modules):
            continue
        if config.layers_to_transform is not None:
            m = _LAYER_INDEX.search(name)
            if m is None or int(m.group(1)) not in config.layers_to_transform:
                continue
        if not is_adaptable(module):
            raise TypeError(
                f"target {name!r} is a {type(module).__name__}; only nn.Linear and transformers Conv1D can be adapted"
            )
        targets.append(name)
    if not targets:
        sample = ", ".join(seen[:8]) or "(the model has no Linear/Conv1D modules)"
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}; "
            f"linear modules it has include: {sample}"
        )
    return targets


def find_modules_to_save(model: nn.Module, config: HLoRAConfig) -> list:
    """Module paths the config's ``modules_to_save`` names in ``model``; an error naming any that match nothing."""
    if not config.modules_to_save:
        return []
    found = [n for n, _ in model.named_modules() if n and _name_matches(n, config.modules_to_save)]
    missing = [t for t in config.modules_to_save if not any(n == t or n.endswith("." + t) for n in found)]
    if missing:
        raise ValueError(f"modules_to_save {missing} match no module of {type(model).__name__}")
    return found


def plugin_layout(model: nn.Module, config: HLoRAConfig) -> dict:
    """Module path -> the plugin names its adapter layer holds, in module order.

    A plugin listed in ``config.plugin_targets`` sits at exactly those paths (``hlora.add_plugin``
    with its own targets); every other plugin sits at ``find_targets(model, config)``. Paths that
    would hold no plugin are left out."""
    own = config.plugin_targets or {}
    shared = [n for n in config.plugin_names if n not in own]
    default = set(find_targets(model, config)) if shared else set()
    modules = dict(model.named_modules())
    for name, paths in own.items():
        bad = [p for p in paths if p not in modules or not (is_adaptable(modules[p]) or isinstance(modules[p], AdapterLayer))]
        if bad:
            raise ValueError(f"plugin {name!r} targets {bad}, which are not Linear/Conv1D modules of {type(model).__name__}")
    layout = {}
    for path in modules:
        names = [n for n in config.plugin_names if (path in own[n] if n in own else path in default)]
        if names:
            layout[path] = names
    return layout


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


# ---- injecting ------------------------------------------------------------------------------------


def inject(model: nn.Module, config: HLoRAConfig) -> nn.Module:
    """Swap every target module for an adapter layer holding all of ``config.plugins``, in place.

    Base parameters are frozen (plugins and ``modules_to_save`` train). The first plugin is active,
    as PEFT activates its adapter; route with ``set_task``. Returns ``model`` itself.
    """
    if get_config(model) is not None:
        raise RuntimeError("model already has hlora plugins; use hlora.unload(model) first, or hlora.load to add weights")
    layout = plugin_layout(model, config)
    find_modules_to_save(model, config)  # validate before touching the model
    for p in model.parameters():
        p.requires_grad_(False)
    for path, names in layout.items():
        _set_submodule(model, path, _new_layer(config, model.get_submodule(path), names))
    setattr(model, _CONFIG_ATTR, config)
    set_trainable(model)
    set_task(model, config.plugin_names[0])
    return model


def _new_layer(config: HLoRAConfig, base: nn.Module, names: list) -> AdapterLayer:
    """The adapter layer wrapping ``base`` with plugins ``names`` (indices in model-wide order)."""
    layer_cls = quantized_layer_class(base, config.variant) or LAYER_CLASSES[config.variant]
    layer = layer_cls(base, {n: config.plugins[n] for n in names}, config.plugin_names)
    return layer.train(base.training)  # a new module starts in training mode: dropout in an eval model


def unload(model: nn.Module) -> nn.Module:
    """Put the original base modules back (plugins dropped; a merged plugin stays in the weights)."""
    for path, layer in list(named_adapter_layers(model)):
        _set_submodule(model, path, layer.base_layer)
    if hasattr(model, _CONFIG_ATTR):
        delattr(model, _CONFIG_ATTR)
    if hasattr(model, _TASK_ATTR):
        delattr(model, _TASK_ATTR)
    return model


def get_config(model: nn.Module) -> HLoRAConfig | None:
    return getattr(model, _CONFIG_ATTR, None)


def _require_config(model: nn.Module) -> HLoRAConfig:
    config = get_config(model)
    if config is None:
        raise RuntimeError(f"{type(model).__name__} has no hlora plugins: call hlora.inject(model, config) first")
    return config


def named_adapter_layers(model: nn.Module) -> Iterator:
    """(module path, ``AdapterLayer``) for every adapted layer of ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def adapter_layers(model: nn.Module) -> list:
    """The ``AdapterLayer`` modules of ``model``, in module order."""
    return [m for _, m in named_adapter_layers(model)]


# ---- routing --------------------------------------------------------------------------------------


def _plugin_index(names: list, t) -> int:
    if t is None:
        return -1
    if isinstance(t, str):
        if t not in names:
            raise ValueError(f"unknown task {t!r}; this model's plugins are {names}")
        return names.index(t)
    if isinstance(t, int) and -1 <= t < len(names):
        return int(t)
    raise ValueError(f"task {t!r} is neither a plugin name, None, nor an index in [-1, {len(names)})")


def _to_routing(names: list, task: Task) -> Routing | None:
    if task is None:
        return None
    if isinstance(task, str):
        return Routing((_plugin_index(names, task),))
    if isinstance(task, torch.Tensor):
        if task.dtype.is_floating_point or task.dtype == torch.bool or task.dim() != 1:
            raise ValueError(f"a task tensor must be a 1-D integer tensor of plugin indices, got {task.dtype} {tuple(task.shape)}")
        ids = task.detach().to("cpu", torch.int64)
        bad = ids[(ids < -1) | (ids >= len(names))]
        if bad.numel():
            raise ValueError(f"task indices {bad.tolist()} are outside [-1, {len(names)}) for plugins {names}")
        return Routing.from_sample_ids(ids)
    if isinstance(task, (list, tuple)):
        if not task:
            raise ValueError("an empty task list routes no sample")
        return Routing.from_sample_ids(torch.tensor([_plugin_index(names, t) for t in task], dtype=torch.int64))
    raise TypeError(f"task must be a plugin name, None, a list of names, or an int tensor; got {type(task).__name__}")


def set_task(model: nn.Module, task: Task) -> None:
    """Route every adapter layer of ``model``.

    ``task``: a plugin name (whole batch), ``None`` (base model only), or one entry per sample of the
    next batches: a list of names/``None`` or an int tensor of plugin indices (-1 = base only).
    """
    config = _require_config(model)
    routing = _to_routing(config.plugin_names, task)
    for layer in adapter_layers(model):
        layer.set_routing(routing)
    setattr(model, _TASK_ATTR, task)


def get_task(model: nn.Module) -> Task:
    _require_config(model)
    return getattr(model, _TASK_ATTR, None)


@contextlib.contextmanager
def task(model: nn.Module, task: Task):
    """``with hlora.task(model, "gen"):`` route inside the block, restore the previous routing after.

    Routing is read again by gradient checkpointing's recompute during backward: call
    ``backward()`` inside the block (or use ``set_task``) when checkpointing.
    """
    previous = get_task(model)
    set_task(model, task)
    try:
        yield model
    finally:
        set_task(model, previous)


# ---- training -------------------------------------------------------------------------------------


def set_trainable(model: nn.Module, plugins: Sequence[str] | None = None, modules_to_save: bool = True) -> None:
    """Freeze everything, then unfreeze the named plugins (all when ``None``) and, if asked, the
    config's ``modules_to_save``."""
    config = _require_config(model)
    plugins = config.plugin_names if plugins is None else list(plugins)
    for name in plugins:
        _plugin_index(config.plugin_names, name)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in adapter_layers(model):
        for name in plugins:
            if name in layer.plugins:
                layer.plugins[name].requires_grad_(True)
    if modules_to_save:
        for path in find_modules_to_save(model, config):
            model.get_submodule(path).requires_grad_(True)


def set_dropout(model: nn.Module, dropout: dict) -> None:
    """Set each named plugin's dropout probability (``{plugin: p}``, p in [0, 1)) in the model's
    config and in every adapter layer together, so ``hlora.save`` records what the layers use.
    All names and values are checked before anything changes."""
    config = _require_config(model)
    updated = {}
    for name, p in dropout.items():
        if name not in config.plugins:
            raise ValueError(f"unknown plugin {name!r}; this model's plugins are {config.plugin_names}")
        updated[name] = replace(config.plugins[name], dropout=float(p))  # PluginConfig validates p
    config.plugins.update(updated)
    for layer in adapter_layers(model):
        for name, cfg in updated.items():
            if name in layer.plugins:
                layer.plugins[name].dropout = cfg.dropout


def trainable_parameters(model: nn.Module) -> dict:
    """name -> Parameter for every parameter that requires grad (hand these to the optimizer)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def print_trainable_parameters(model: nn.Module) -> tuple:
    trainable = sum(p.numel() for p in trainable_parameters(model).values())
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / max(total, 1):.4f}")
    return trainable, total


# ---- adding and deleting plugins ----------------------------------------------------------------


def _adaptable_paths(model: nn.Module, spec: TargetSpec) -> list:
    """Paths of ``model`` that ``spec`` (as ``HLoRAConfig.target_modules``) picks among its adapter
    layers and its not-yet-adapted Linear/Conv1D modules."""
    heads = _output_head_names(model)
    paths, adapted = [], [n for n, _ in named_adapter_layers(model)]
    for name, module in model.named_modules():
        if not name or not (isinstance(module, AdapterLayer) or is_adaptable(module)):
            continue
        if any(name.startswith(a + ".") for a in adapted):  # a module an adapter layer holds is not a target
            continue
        if (name not in heads) if spec == "all-linear" else _name_matches(name, spec):
            paths.append(name)
    return paths


def require_unmerged(model: nn.Module, action: str) -> None:
    merged = sorted({layer.merged for layer in adapter_layers(model) if layer.merged is not None})
    if merged:
        raise RuntimeError(f"cannot {action} while plugin {merged[0]!r} is merged into the base weights; call hlora.unmerge(model) first")


def _reroute(model: nn.Module, names: list) -> None:
    """Route again after the plugin list changed: the same task if it names only plugins still there
    (an int tensor's indices would now mean other plugins), else the first plugin."""
    previous = getattr(model, _TASK_ATTR, None)
    if previous is None or isinstance(previous, str) and previous in names:
        set_task(model, previous)
    elif isinstance(previous, (list, tuple)) and all(t is None or t in names for t in previous):
        set_task(model, previous)
    else:
        set_task(model, names[0])


def add_plugin(model: nn.Module, name: str, plugin, target_modules: TargetSpec | None = None,
               freeze_existing: bool = True) -> None:
    """Add a new task's plugin to an injected model, as PEFT's ``add_adapter``.

    ``plugin``: a ``PluginConfig`` (or its dict). ``target_modules``: where it goes, in any form
    ``HLoRAConfig.target_modules`` takes (matched against the model's adapted and plain linear
    modules); ``None``: every adapted layer. Modules not adapted yet get an adapter layer holding
    only this plugin; the new plugin gets the next index. What the existing plugins compute is
    unchanged (their tensors and routing are untouched). The new plugin is trainable; with
    ``freeze_existing`` everything else is frozen (``modules_to_save`` too: they are shared by
    every task), otherwise the other ``requires_grad`` flags stay as they are. The model's config
    (what ``hlora.save`` writes) records the plugin and, if they differ from the others', its paths.
    Refused while a plugin is merged. The current task stays routed.
    """
    config = _require_config(model)
    require_unmerged(model, f"add plugin {name!r}")
    if name in config.plugins:
        raise ValueError(f"plugin {name!r} already exists (plugins {config.plugin_names}); hlora.delete_plugin it first or pick another name")
    new_config = HLoRAConfig.from_dict({**config.to_dict(), "plugins": {**config.plugins, name: plugin}})  # validates
    layers = dict(named_adapter_layers(model))
    paths = list(layers) if target_modules is None else _adaptable_paths(model, target_modules)
    if not paths:
        raise ValueError(f"target_modules={target_modules!r} matched no linear module of {type(model).__name__}")
    own = config.plugin_targets or {}
    shared = {p for p, layer in layers.items() if any(n in layer.plugins and n not in own for n in config.plugin_names)}
    if set(paths) != shared:
        new_config.plugin_targets = {**own, name: sorted(paths)}
    cfg = new_config.plugins[name]
    for path, layer in layers.items():
        if path in paths:
            layer.add_plugin(name, cfg)
        else:
            layer.plugin_names.append(name)
    for path in paths:
        if path not in layers:
            _set_submodule(model, path, _new_layer(new_config, model.get_submodule(path), [name]))
    config.plugins, config.plugin_targets = new_config.plugins, new_config.plugin_targets
    if freeze_existing:
        set_trainable(model, [name], modules_to_save=False)
    else:
        for layer in adapter_layers(model):
            if name in layer.plugins:
                layer.plugins[name].requires_grad_(True)
    _reroute(model, config.plugin_names)


def delete_plugin(model: nn.Module, name: str) -> None:
    """Remove plugin ``name`` from the model and its config, as PEFT's ``delete_adapter``; layers
    left without plugins get their base module back. The other plugins keep their tensors and
    compute the same; later plugins' indices move down by one. The task is re-routed as before if
    it does not name the deleted plugin, else to the first remaining one. Refused while merged."""
    config = _require_config(model)
    _plugin_index(config.plugin_names, name)
    if len(config.plugins) == 1:
        raise ValueError(f"{name!r} is the model's only plugin; use hlora.unload(model) to remove hlora altogether")
    require_unmerged(model, f"delete plugin {name!r}")
    for path, layer in list(named_adapter_layers(model)):
        layer.remove_plugin(name)
        if not layer.plugins:
            _set_submodule(model, path, layer.base_layer)
    config.plugins = {n: p for n, p in config.plugins.items() if n != name}
    config.plugin_targets = {n: t for n, t in (config.plugin_targets or {}).items() if n != name} or None
    _reroute(model, config.plugin_names)


# ---- merging --------------------------------------------------------------------------------------


def merge(model: nn.Module, plugin: str) -> None:
    """Fold ``plugin`` into the base weights (exact only for k = 1: otherwise a clear error).

    Afterwards the model may only be routed to ``plugin`` (or nothing would change what it computes,
    so any other routing is an error) until ``unmerge``.
    """
    config = _require_config(model)
    _plugin_index(config.plugin_names, plugin)
    if config.plugins[plugin].num_experts != 1 and config.variant != "lora":
        raise ValueError(
            f"plugin {plugin!r} has {config.plugins[plugin].num_experts} experts: its per-token softmax mixture "
            f"is not a fixed weight, so merging is exact only for k = 1"
        )
    layers = adapter_layers(model)
    merged = []
    try:
        for layer in layers:
            if plugin in layer.plugins:
                layer.merge(plugin)
                merged.append(layer)
    except Exception:
        for layer in merged:
            layer.unmerge()
        raise
    set_task(model, plugin)


def unmerge(model: nn.Module) -> None:
    _require_config(model)
    for layer in adapter_layers(model):
        if layer.merged is not None:
            layer.unmerge()
