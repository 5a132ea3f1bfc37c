"""hlora: H-LoRA mixture-of-LoRA-experts plugins for any PyTorch / Hugging Face model.

    config = hlora.HLoRAConfig(plugins={"comp": hlora.PluginConfig(64, 4, 128),
                                        "gen": hlora.PluginConfig(256, 4, 512)},
                               target_modules="all-linear")
    hlora.inject(model, config)
    hlora.set_task(model, ["comp", "gen", "comp"])   # one task per sample of the next batch
    hlora.save(model, "ckpt")
"""

from . import functional
from .checked import CheckpointError, copy_checked
from .config import HLoRAConfig, PluginConfig
from .interop import from_peft, to_peft
from .io import load, plugin_state_dict, save
from .layer import AdapterLayer, HLoRALinear, LoRALinear, MoELoRALinear
from .model import (
    add_plugin,
    adapter_layers,
    delete_plugin,
    get_config,
    get_task,
    inject,
    merge,
    named_adapter_layers,
    print_trainable_parameters,
    set_dropout,
    set_task,
    set_trainable,
    task,
    trainable_parameters,
    unload,
    unmerge,
)

__version__ = "0.1.0"

__all__ = [
    "PluginConfig",
    "HLoRAConfig",
    "inject",
    "unload",
    "add_plugin",
    "delete_plugin",
    "set_task",
    "get_task",
    "task",
    "set_trainable",
    "set_dropout",
    "trainable_parameters",
    "print_trainable_parameters",
    "merge",
    "unmerge",
    "save",
    "load",
    "plugin_state_dict",
    "from_peft",
    "to_peft",
    "CheckpointError",
    "copy_checked",
    "adapter_layers",
    "named_adapter_layers",
    "get_config",
    "AdapterLayer",
    "HLoRALinear",
    "MoELoRALinear",
    "LoRALinear",
    "functional",
]
