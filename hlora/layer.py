"""Adapted layers: a frozen base linear plus named plugins, routed per model or per sample.

``AdapterLayer`` owns what every variant shares: the base weight (the same ``Parameter`` objects as
the module it replaced, so base state-dict keys do not change), the routing state, merging.
Subclasses say how one plugin is stored and computed:

- ``HLoRALinear``: H-LoRA, experts concatenated, all plugins through ``hlora.functional.hlora_linear``.
- ``MoELoRALinear``: the same mixture with k separate experts computed one by one (baseline).
- ``LoRALinear``: plain LoRA of the same total rank and scale (baseline).
"""

from __future__ import annotations

import contextlib
import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import PluginConfig
from .functional import hlora_linear, hlora_mixture, router_gates
from .routing import Routing, renumber
from .zero3 import full_shape, is_partitioned, register_external, unregister_external

__all__ = ["AdapterLayer", "HLoRALinear", "MoELoRALinear", "LoRALinear", "Plugin", "is_adaptable", "register_zero3_plugins",
           "stacks_as_built"]


def _conv1d_cls():
    """transformers' ``Conv1D`` if transformers has defined it, else ``None``. Looked up rather than
    imported: a model holding a Conv1D has imported its module already, and hlora must not pull in
    transformers (optional) for plain PyTorch models."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_adaptable(module: nn.Module) -> bool:
    """``nn.Linear`` (or a subclass that keeps its forward), transformers' ``Conv1D``, or a quantized
    linear (bitsandbytes 4-bit / 8-bit, torchao: ``hlora.quantized``)."""
    from .quantized import is_quantized_linear  # here: hlora.quantized subclasses this module's layers

    conv1d = _conv1d_cls()
    if (conv1d is not None and isinstance(module, conv1d)) or is_quantized_linear(module):
        return True
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _kaiming(t: torch.Tensor) -> torch.Tensor:
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class Plugin(nn.Module):
    """One task's H-LoRA parameters: ``A`` [R, d_in], ``B`` [d_out, R], ``router`` [k, d_in]."""

    def __init__(self, cfg: PluginConfig, d_in: int, d_out: int, *, device=None, dtype=None):
        super().__init__()
        self.rank, self.num_experts, self.scale, self.dropout = cfg.rank, cfg.num_experts, cfg.scale, cfg.dropout
        kw = dict(device=device, dtype=dtype)
        self.A = nn.Parameter(torch.empty(cfg.rank, d_in, **kw))
        self.B = nn.Parameter(torch.zeros(d_out, cfg.rank, **kw))
        self.router = nn.Parameter(torch.empty(cfg.num_experts, d_in, **kw))
        with torch.no_grad():
            if cfg.init == "gaussian":
                nn.init.normal_(self.A, std=1.0 / cfg.expert_rank)
            else:
                _kaiming(self.A)
            _kaiming(self.router)

    def delta_weight(self) -> torch.Tensor:
        """s * B A, the exact weight update when k = 1 (the softmax over one expert is 1)."""
        if self.num_experts != 1:
            raise ValueError(f"merging is exact only for k = 1; this plugin has {self.num_experts} experts")
        return self.scale * (self.B.double() @ self.A.double())


class _MoEExpert(nn.Module):
    def __init__(self, r: int, d_in: int, d_out: int, **kw):
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, d_in, **kw))
        self.B = nn.Parameter(torch.zeros(d_out, r, **kw))


class MoEPlugin(nn.Module):
    """k separate experts ``experts[i].A`` [r, d_in], ``experts[i].B`` [d_out, r] and a ``router``."""

    def __init__(self, cfg: PluginConfig, d_in: int, d_out: int, *, device=None, dtype=None):
        super().__init__()
        self.rank, self.num_experts, self.scale, self.dropout = cfg.rank, cfg.num_experts, cfg.scale, cfg.dropout
        kw = dict(device=device, dtype=dtype)
        self.experts = nn.ModuleList(_MoEExpert(cfg.expert_rank, d_in, d_out, **kw) for _ in range(cfg.num_experts))
        self.router = nn.Parameter(torch.empty(cfg.num_experts, d_in, **kw))
        with torch.no_grad():
            for e in self.experts:
                if cfg.init == "gaussian":
                    nn.init.normal_(e.A, std=1.0 / cfg.expert_rank)
                else:
                    _kaiming(e.A)
            _kaiming(self.router)

    def delta_weight(self) -> torch.Tensor:
        if self.num_experts != 1:
            raise ValueError(f"merging is exact only for k = 1; this plugin has {self.num_experts} experts")
        e = self.experts[0]
        return self.scale * (e.B.double() @ e.A.double())


class LoRAPlugin(nn.Module):
    """Plain LoRA: ``A`` [R, d_in], ``B`` [d_out, R], ``scale = alpha / (R / k)`` like H-LoRA."""

    def __init__(self, cfg: PluginConfig, d_in: int, d_out: int, *, device=None, dtype=None):
        super().__init__()
        self.rank, self.scale, self.dropout = cfg.rank, cfg.scale, cfg.dropout
        kw = dict(device=device, dtype=dtype)
        self.A = nn.Parameter(torch.empty(cfg.rank, d_in, **kw))
        self.B = nn.Parameter(torch.zeros(d_out, cfg.rank, **kw))
        with torch.no_grad():
            nn.init.normal_(self.A, std=1.0 / cfg.rank) if cfg.init == "gaussian" else _kaiming(self.A)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.B.double() @ self.A.double())


class AdapterLayer(nn.Module):
    """A frozen base linear with named plugins.

    Routing (set through ``hlora.set_task``) is layer state, not a one-shot hook, so gradient
    checkpointing's recompute sees the same routing as the original forward:
    ``None`` (base only) or a ``Routing`` shared by all layers of the model.
    """

    plugin_cls: type = Plugin

    def __init__(self, base: nn.Module, plugins: dict, plugin_names: list):
        super().__init__()
        if not is_adaptable(base):
            raise TypeError(f"cannot adapt {type(base).__name__}: only nn.Linear and transformers Conv1D are supported")
        self.fan_in_fan_out = not isinstance(base, nn.Linear)  # Conv1D stores weight as [d_in, d_out]
        self.weight = base.weight
        self.bias = base.bias
        shape = full_shape(base.weight)  # a weight partitioned by DeepSpeed ZeRO-3 (zero.Init) holds [0]
        d_in, d_out = (shape[::-1] if not self.fan_in_fan_out else shape)
        self.in_features, self.out_features = int(d_in), int(d_out)
        object.__setattr__(self, "base_layer", base)  # kept outside the module tree, for unload()
        self.plugins = nn.ModuleDict()
        self.plugin_names = list(plugin_names)  # model-wide order: index i means plugin_names[i]
        for name, cfg in plugins.items():
            self.add_plugin(name, cfg)
        self.routing: Routing | None = None
        self.merged: str | None = None

    def train(self, mode: bool = True):
        """``nn.Module.train``, reaching the base too (it sits outside the module tree): a base left in
        eval mode while the model trains may take an inference-only path (bitsandbytes 0.50 repacks a
        4-bit weight in place on CPUs with AVX512-BF16)."""
        super().train(mode)
        self.base_layer.train(mode)
        return self

    def add_plugin(self, name: str, cfg: PluginConfig) -> None:
        if name not in self.plugin_names:
            self.plugin_names.append(name)
        self.plugins[name] = self.plugin_cls(
            cfg, self.in_features, self.out_features, device=self.weight.device, dtype=self.weight.dtype
        )
        if is_partitioned(self.weight):  # the base is a DeepSpeed ZeRO-3 parameter: so will the plugin's be
            register_zero3_plugins(self)

    def remove_plugin(self, name: str) -> None:
        """Drop plugin ``name`` (held here or not) and its slot in the model-wide order."""
        if name == self.merged:
            raise RuntimeError(f"plugin {name!r} is merged into the base weight; unmerge it first")
        if name in self.plugins:
            unregister_external(self, self.plugins[name].parameters())  # (register_zero3_plugins)
            del self.plugins[name]
        self.plugin_names.remove(name)

    @property
    def base_weight(self) -> torch.Tensor:
        """The base weight as [d_out, d_in] (a transposed view for Conv1D)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def extra_repr(self) -> str:
        plugins = ", ".join(f"{n}(R={p.rank}, k={getattr(p, 'num_experts', 1)})" for n, p in self.plugins.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, plugins=[{plugins}]"

    # ---- routing --------------------------------------------------------------------------------

    def set_routing(self, routing: Routing | int | None) -> None:
        """``None`` (base only), a ``Routing``, or an int plugin index (the whole batch)."""
        self.routing = Routing((routing,)) if isinstance(routing, int) else routing

    def _route(self, x: torch.Tensor):
        """-> (active plugin names, per-token index into them [T], or None when all tokens share one)."""
        if self.routing is None:
            return [], None
        names, token_plugin = [self.plugin_names[i] for i in self.routing.active], self.routing.token_plugin(x)
        if all(n in self.plugins for n in names):
            return names, token_plugin
        return _held_only(names, token_plugin, self.plugins)

    # ---- forward --------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names, token_plugin = self._route(x)
        if self.merged is not None:
            if names != [self.merged] or token_plugin is not None:
                raise RuntimeError(
                    f"plugin {self.merged!r} is merged into the base weight; route to it alone or unmerge first"
                )
            names = []
        if not names:
            return F.linear(x, self.base_weight, self.bias)
        return self.adapted_forward(x, names, token_plugin)

    def adapted_forward(self, x, names, token_plugin):
        raise NotImplementedError

    # ---- merging --------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if self.merged is not None:
            raise RuntimeError(f"plugin {self.merged!r} is already merged; unmerge it first")
        delta = self.plugins[name].delta_weight()  # raises unless exact
        delta = delta.t() if self.fan_in_fan_out else delta
        self.weight.copy_((self.weight.double() + delta).to(self.weight.dtype))
        self.merged = name

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged is None:
            raise RuntimeError("no plugin is merged into this layer")
        delta = self.plugins[self.merged].delta_weight()
        delta = delta.t() if self.fan_in_fan_out else delta
        self.weight.copy_((self.weight.double() - delta).to(self.weight.dtype))
        self.merged = None


class HLoRALinear(AdapterLayer):
    """H-LoRA: per plugin ``A`` [R, d_in], ``B`` [d_out, R], ``router`` [k, d_in], ``scale = alpha/(R/k)``;
    ``y = W0 x + b + B (dropout(s A x) * repeat_interleave(softmax(router x), R/k))``."""

    plugin_cls = Plugin

    def adapted_forward(self, x, names, token_plugin):
        return self.mixture(x, self.base_weight, self.bias, names, token_plugin)

    def mixture(self, x, base, bias, names, token_plugin):
        """``hlora_linear`` over the routed plugins, stacked along the rank axis; ``base`` is the
        weight tensor, or a module computing the base product itself (quantized bases). A mixed
        batch goes through ``hlora_mixture`` with each plugin's tensors and the routing's grouping
        of tokens by plugin (built once per routing, shared by all layers): no concatenation, and
        on the kernels each plugin's rank work runs on its own tokens only."""
        ps = [self.plugins[n] for n in names]
        if len(ps) > 1 and token_plugin is not None:
            active = [self.plugin_names[i] for i in self.routing.active]
            keep = None if names == active else tuple(active.index(n) for n in names)
            return hlora_mixture(
                x, base, bias, [p.A for p in ps], [p.B for p in ps], [p.router for p in ps],
                [p.rank for p in ps], [p.num_experts for p in ps], [p.scale for p in ps],
                token_plugin, self.routing.token_groups(x, keep), [p.dropout for p in ps], self.training,
                stacked=lambda: self._stacked(names, ps),
            )
        return hlora_linear(
            x,
            base,
            bias,
            _stack([p.A for p in ps]),
            _stack([p.B for p in ps], dim=1),
            _stack([p.router for p in ps]),
            [p.rank for p in ps],
            [p.num_experts for p in ps],
            [p.scale for p in ps],
            token_plugin,
            [p.dropout for p in ps],
            self.training,
        )


    def _stacked(self, names, ps):
        """-> (A, B, router) of plugins ``ps`` (named ``names``) stacked along the rank axis, or ``None``
        when autograd must see the concatenation (a plugin tensor requires grad and grad mode is on).
        For inference the stack is built once and kept while it is valid: it remembers the tensors
        it was built from (the objects themselves, so a removed plugin's cannot be mistaken for a new
        one's), their ``_version`` (bumped by every in-place write: an optimizer step,
        ``load_state_dict``) and ``data_ptr`` (new storage: ``.to()``, ``.data =``), so a mixed batch
        does not copy every plugin's weights per call (a decode step would, per layer and step).

        Under ``torch.compile`` a graph cannot check versions: it concatenates itself, except inside
        ``stacks_as_built()``, whose caller vouches that the stack an eager call built for these
        plugins is current (a static decoder: its first step is eager, and it is keyed on every
        parameter's version); the graph then reads that stack (guarded on the plugins' names)."""
        tensors = [t for p in ps for t in (p.A, p.B, p.router)]
        if torch.compiler.is_compiling():
            cached = getattr(self, "_stack_cache", None)
            if _stacks_as_built and cached is not None and cached[3] == tuple(names):
                return cached[2]
            return None
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return None
        state = tuple((t._version, t.data_ptr()) for t in tensors)
        cached = getattr(self, "_stack_cache", None)
        if cached is None or cached[1] != state or len(cached[0]) != len(tensors) or any(
                a is not b for a, b in zip(cached[0], tensors)):
            with torch.no_grad():
                stack = (torch.cat([p.A for p in ps]), torch.cat([p.B for p in ps], 1), torch.cat([p.router for p in ps]))
            self._stack_cache = cached = (tensors, state, stack, tuple(names))
        return cached[2]


_stacks_as_built = False  # set by ``stacks_as_built``, read by ``HLoRALinear._stacked`` under torch.compile


@contextlib.contextmanager
def stacks_as_built():
    """Within the block, a ``torch.compile``d mixed batch reads each layer's plugin stack as an eager
    call last built it, rather than concatenating the plugins in the graph (``HLoRALinear._stacked``):
    for a caller that knows no plugin changed since that eager call."""
    global _stacks_as_built
    previous, _stacks_as_built = _stacks_as_built, True
    try:
        yield
    finally:
        _stacks_as_built = previous


def register_zero3_plugins(layer: AdapterLayer) -> None:
    """DeepSpeed ZeRO-3 gathers a module's own parameters just before its forward (and again for its
    backward) and frees them after; the layer's forward reads its plugins' tensors directly (their
    modules never run), so they are registered as the layer's external parameters and gathered with
    its base weight. Idempotent; ``AdapterLayer.add_plugin`` calls it when the base weight is already
    partitioned (a model built under ``zero.Init``); a model partitioned after injection (by
    ``deepspeed.initialize``) needs it called on every adapter layer first."""
    register_external(layer, layer.plugins.parameters())


def _held_only(names: list, token_plugin, held) -> tuple:
    """Routing restricted to the plugins a layer holds (plugins added with their own targets are
    absent elsewhere): tokens of an absent plugin take the base model only (index -1)."""
    keep = [i for i, n in enumerate(names) if n in held]
    if not keep:
        return [], None
    if token_plugin is None:  # one plugin for the whole batch, and this layer holds it
        return [names[keep[0]]], None
    return [names[i] for i in keep], renumber(token_plugin, keep, len(names))


def _stack(tensors, dim=0):
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def _token_masks(x, names, token_plugin):
    """Per active plugin: a [..., 1] float mask of its tokens (None when all tokens are its)."""
    if token_plugin is None:
        return [None]
    shape = (*x.shape[:-1], 1)
    return [(token_plugin == i).to(x.dtype).view(shape) for i in range(len(names))]


class MoELoRALinear(AdapterLayer):
    """Baseline: the H-LoRA mixture with each expert computed as its own LoRA, one after another."""

    plugin_cls = MoEPlugin

    def adapted_forward(self, x, names, token_plugin):
        y = F.linear(x, self.base_weight, self.bias)
        for name, mask in zip(names, _token_masks(x, names, token_plugin)):
            p = self.plugins[name]
            g = router_gates(F.linear(x, p.router)).to(x.dtype)
            if mask is not None:
                g = g * mask
            for i, e in enumerate(p.experts):
                h = F.dropout(F.linear(x, e.A) * p.scale, p.dropout, self.training)
                y = y + F.linear(h * g[..., i : i + 1], e.B)
        return y


class LoRALinear(AdapterLayer):
    """Baseline: PEFT-style LoRA, ``y = W0 x + b + s B dropout(A x)`` (no router)."""

    plugin_cls = LoRAPlugin

    def adapted_forward(self, x, names, token_plugin):
        y = F.linear(x, self.base_weight, self.bias)
        for name, mask in zip(names, _token_masks(x, names, token_plugin)):
            p = self.plugins[name]
            h = F.dropout(x, p.dropout, self.training) if p.dropout > 0 else x
            d = F.linear(F.linear(h, p.A), p.B) * p.scale
            y = y + (d if mask is None else d * mask)
        return y


LAYER_CLASSES = {"hlora": HLoRALinear, "moelora": MoELoRALinear, "lora": LoRALinear}
