"""Configuration dataclasses: one ``PluginConfig`` per task, one ``HLoRAConfig`` per model."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Union

from .files import atomic_write

__all__ = ["PluginConfig", "HLoRAConfig", "INITS", "VARIANTS", "CONFIG_NAME"]

CONFIG_NAME = "hlora_config.json"

INITS = ("official", "gaussian")
"""``official``: A and router Kaiming-uniform (a=sqrt(5)), B zeros (HealthGPT's release; a fresh
plugin is a no-op). ``gaussian``: A ~ N(0, 1/r) like PEFT's ``init_lora_weights="gaussian"``,
router Kaiming-uniform, B zeros."""

VARIANTS = ("hlora", "moelora", "lora")
"""``hlora``: concatenated experts, two GEMMs. ``moelora``: the same mixture with k separate experts
computed one by one (the paper's baseline). ``lora``: plain LoRA of the same total rank R and the
same scale, no router (PEFT-style)."""


@dataclass
class PluginConfig:
    """One task's plugin: ``num_experts`` LoRA experts of rank ``rank // num_experts`` each.

    Attributes:
        rank: total rank R over all experts (A is [R, d_in], B is [d_out, R]).
        num_experts: k, mixed per token by a dense softmax router [k, d_in].
        alpha: scaling numerator; the layer applies ``scale = alpha / (R / k)`` (per-expert rank).
        dropout: dropout probability on the rank-space activations ``scale * A x`` while training.
        init: one of ``INITS``.
    """

    rank: int
    num_experts: int
    alpha: float
    dropout: float = 0.0
    init: str = "official"

    def __post_init__(self):
        if int(self.rank) != self.rank or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if int(self.num_experts) != self.num_experts or self.num_experts < 1:
            raise ValueError(f"num_experts must be a positive integer, got {self.num_experts!r}")
        self.rank, self.num_experts = int(self.rank), int(self.num_experts)
        if self.rank % self.num_experts:
            raise ValueError(
                f"rank {self.rank} is the total over all experts and must be divisible by "
                f"num_experts={self.num_experts} (each expert gets rank // num_experts)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")

    @property
    def expert_rank(self) -> int:
        """r, the rank of one expert."""
        return self.rank // self.num_experts

    @property
    def scale(self) -> float:
        """alpha / r, over the per-expert rank as HealthGPT computes it."""
        return self.alpha / self.expert_rank


TargetSpec = Union[list, str]


@dataclass
class HLoRAConfig:
    """Which modules of a model get which plugins.

    Attributes:
        plugins: task name -> ``PluginConfig``; the order fixes each plugin's integer index (used by
            per-sample routing with int tensors).
        target_modules: a list of module names (exact or ``.``-suffix match), a regex string (full
            match against the module path), or ``"all-linear"`` (every ``nn.Linear`` / transformers
            ``Conv1D`` except the output head).
        exclude_modules: names (list, exact or suffix) or a regex string never to adapt.
        layers_to_transform: only adapt modules whose path holds one of these layer indices.
        modules_to_save: modules (exact or suffix names) trained in full and saved with the plugins,
            e.g. ``["lm_head", "embed_tokens"]``.
        variant: one of ``VARIANTS``; the baselines share this config surface.
        plugin_targets: plugin name -> the exact module paths it adapts, for plugins that do not
            sit at ``target_modules`` (``hlora.add_plugin`` with its own targets); ``None``: none.
    """

    plugins: dict
    target_modules: TargetSpec = "all-linear"
    exclude_modules: TargetSpec | None = None
    layers_to_transform: list | None = None
    modules_to_save: list | None = None
    variant: str = "hlora"
    plugin_targets: dict | None = None

    def __post_init__(self):
        if not self.plugins:
            raise ValueError("HLoRAConfig needs at least one plugin")
        self.plugins = {
            str(name): p if isinstance(p, PluginConfig) else PluginConfig(**p) for name, p in self.plugins.items()
        }
        for name in self.plugins:
            if not name.isidentifier():
                raise ValueError(f"plugin name {name!r} must be a Python identifier (it becomes a module key)")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules) if isinstance(self.target_modules, set) else list(self.target_modules)
        if isinstance(self.exclude_modules, (tuple, set)):
            self.exclude_modules = list(self.exclude_modules)
        if self.layers_to_transform is not None:
            if isinstance(self.layers_to_transform, int):
                self.layers_to_transform = [self.layers_to_transform]
            self.layers_to_transform = [int(i) for i in self.layers_to_transform]
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        if self.plugin_targets:
            unknown = sorted(set(self.plugin_targets) - set(self.plugins))
            if unknown:
                raise ValueError(f"plugin_targets names {unknown}, which are not plugins ({self.plugin_names})")
            self.plugin_targets = {n: sorted(set(self.plugin_targets[n])) for n in self.plugins if n in self.plugin_targets}
        self.plugin_targets = self.plugin_targets or None

    @property
    def plugin_names(self) -> list:
        return list(self.plugins)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "HLoRAConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown HLoRAConfig fields {sorted(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "HLoRAConfig":
        return cls.from_dict(json.loads(text))

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``directory/hlora_config.json`` atomically; returns its path."""
        path = os.path.join(directory, CONFIG_NAME)
        atomic_write(path, self.to_json())
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "HLoRAConfig":
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!s}: not an hlora checkpoint directory")
        with open(path) as f:
            return cls.from_json(f.read())
