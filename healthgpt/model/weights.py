"""HealthGPT weights on disk: our directory format, and the public release's ``.bin`` files.

Our format (``HealthGPT.save_pretrained`` / ``from_pretrained``), one directory::

    healthgpt_config.json        the HealthGPTConfig (base checkpoints by path)
    tokenizer/                   the tokenizer with the generation vocabulary
    plugins/                     hlora.save: both H-LoRA plugins (hlora_config.json + hlora_model.safetensors)
    projectors.safetensors       comp.{0,2}.{weight,bias}, gen.{0,2}.{weight,bias}
    fusion.safetensors           embed_tokens.weight, lm_head.weight (the resized vocabulary)
    image_tokenizer/             VQTokenizer (config.json + model.safetensors)
    llm_base.safetensors         only when llm_path is None (random base): the frozen LLM weights
    vision.safetensors           only when vision_path is None: the vision tower

Every file is replaced atomically. The release (``torch.save`` pickles of a PEFT-wrapped LLaVA
model, read here with ``torch.load(weights_only=True)``)::

    base_model.model.model.layers.{N}.{self_attn.qkv_proj|self_attn.o_proj|mlp.gate_up_proj|mlp.down_proj}
        .lora_A.weight [R, d_in] -> A    .lora_B.weight [d_out, R] -> B    .lora_route.weight [k, d_in] -> router
    base_model.model.model.mm_projector.{0,2}.{weight,bias}  -> the file's task projector
    base_model.model.model.embed_tokens.weight, base_model.model.lm_head.weight  (fusion file)

Every load goes through ``hlora.copy_checked``: all keys, shapes and dtypes are checked before
anything is copied.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file

import hlora
from hlora import CheckpointError, copy_checked
from hlora.files import atomic_write
from hlora.io import WEIGHTS_NAME as HLORA_WEIGHTS

from healthgpt.model.files import require_file
from healthgpt.model.config import CONFIG_NAME, HealthGPTConfig

__all__ = ["save_model", "load_model", "load_release_weights", "release_targets", "CheckpointError"]

TOKENIZER_DIR = "tokenizer"
PLUGINS_DIR = "plugins"
IMAGE_TOKENIZER_DIR = "image_tokenizer"
PROJECTORS_FILE = "projectors.safetensors"
FUSION_FILE = "fusion.safetensors"
LLM_BASE_FILE = "llm_base.safetensors"
VISION_FILE = "vision.safetensors"

_RELEASE_PREFIX = "base_model.model."
_RELEASE_PLUGIN_PARTS = {"A": "lora_A", "B": "lora_B", "router": "lora_route"}  # ours -> the release's


def _save_tensors(state: dict, path: str) -> None:
    # safetensors refuses tensors sharing memory (tied embeddings): write contiguous copies
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))


def _fusion_state(model) -> dict:
    return {
        "embed_tokens.weight": model.llm.get_input_embeddings().weight,
        "lm_head.weight": model.llm.get_output_embeddings().weight,
    }


def _llm_base_state(model) -> dict:
    fusion = {id(t) for t in _fusion_state(model).values()}
    return {k: v for k, v in model.llm.state_dict(keep_vars=True).items() if ".plugins." not in k and id(v) not in fusion}


def _save_tokenizer(tokenizer, directory: str) -> None:
    """``tokenizer.save_pretrained`` into a scratch folder, then each file renamed into place."""
    os.makedirs(directory, exist_ok=True)
    scratch = tempfile.mkdtemp(dir=os.path.dirname(directory), prefix=".tmp-tokenizer-")
    try:
        tokenizer.save_pretrained(scratch)
        for name in os.listdir(scratch):
            os.replace(os.path.join(scratch, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def save_model(model, directory: str | os.PathLike) -> str:
    """Write ``model`` to ``directory`` in our format (module docstring); the config goes last, so
    a directory with ``healthgpt_config.json`` holds a complete save."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    _save_tokenizer(model.tokenizer, os.path.join(directory, TOKENIZER_DIR))
    hlora.save(model.llm, os.path.join(directory, PLUGINS_DIR))
    _save_tensors({f"{t}.{k}": v for t, p in model.projectors.items() for k, v in p.state_dict().items()},
                  os.path.join(directory, PROJECTORS_FILE))
    _save_tensors(_fusion_state(model), os.path.join(directory, FUSION_FILE))
    model.image_tokenizer.save_pretrained(os.path.join(directory, IMAGE_TOKENIZER_DIR))
    if model.healthgpt_config.llm_path is None:
        _save_tensors(_llm_base_state(model), os.path.join(directory, LLM_BASE_FILE))
    if model.healthgpt_config.vision_path is None:
        _save_tensors(model.vision.state_dict(), os.path.join(directory, VISION_FILE))
    text = model.healthgpt_config.to_json()
    atomic_write(os.path.join(directory, CONFIG_NAME), text)
    return directory


def load_model(cls, directory: str | os.PathLike, **overrides):
    """Build the model a ``save_model`` directory describes and load its weights."""
    directory = os.fspath(directory)
    config = HealthGPTConfig.load(directory)
    data = config.to_dict()
    data.update(overrides)
    data["tokenizer_path"] = os.path.join(directory, TOKENIZER_DIR)
    data["image_tokenizer_path"] = os.path.join(directory, IMAGE_TOKENIZER_DIR)
    files = [PROJECTORS_FILE, FUSION_FILE, os.path.join(PLUGINS_DIR, HLORA_WEIGHTS)]
    files += [LLM_BASE_FILE] if data["llm_path"] is None else []
    files += [VISION_FILE] if data["vision_path"] is None else []
    for name in files:
        require_file(os.path.join(directory, name), "HealthGPT weights file")
    model = cls(HealthGPTConfig.from_dict(data))
    if data["llm_path"] is None:
        copy_checked(_llm_base_state(model), load_file(os.path.join(directory, LLM_BASE_FILE)), what=LLM_BASE_FILE)
    if data["vision_path"] is None:
        copy_checked(model.vision.state_dict(keep_vars=True), load_file(os.path.join(directory, VISION_FILE)), what=VISION_FILE)
    projectors = {f"{t}.{k}": v for t, p in model.projectors.items() for k, v in p.state_dict(keep_vars=True).items()}
    copy_checked(projectors, load_file(os.path.join(directory, PROJECTORS_FILE)), what=PROJECTORS_FILE)
    copy_checked(_fusion_state(model), load_file(os.path.join(directory, FUSION_FILE)), what=FUSION_FILE)
    hlora.load(model.llm, os.path.join(directory, PLUGINS_DIR))
    return model


# ---- the public release ---------------------------------------------------------------------------


def release_targets(model, task: str | None) -> dict:
    """release key -> the tensor of ``model`` it loads into, for the release file of plugin ``task``
    (its plugin and projector) or, with ``task=None``, the fusion file (module docstring)."""
    if task is None:
        fusion = _fusion_state(model)
        return {f"{_RELEASE_PREFIX}model.embed_tokens.weight": fusion["embed_tokens.weight"],
                f"{_RELEASE_PREFIX}lm_head.weight": fusion["lm_head.weight"]}
    targets = {}
    for path, layer in hlora.named_adapter_layers(model.llm):
        for ours, theirs in _RELEASE_PLUGIN_PARTS.items():
            targets[f"{_RELEASE_PREFIX}{path}.{theirs}.weight"] = getattr(layer.plugins[task], ours)
    for key, t in model.projectors[task].state_dict(keep_vars=True).items():
        targets[f"{_RELEASE_PREFIX}model.mm_projector.{key}"] = t
    return targets


def _read_release(path: str) -> dict:
    require_file(path, "release weights file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path} with torch.load(weights_only=True): {e}") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return state


def load_release_weights(model, com: str | None = None, gen: str | None = None, fusion: str | None = None) -> None:
    """Load release files into ``model``. Every file is read and every key, shape and dtype checked
    before any value is copied: on any error (missing, unexpected or mis-shaped keys, listed as
    ``com:KEY``, ``gen:KEY``, ``fusion:KEY``) the model is unchanged. A plugin file must hold its
    whole plugin and projector, the fusion file ``embed_tokens`` and ``lm_head``, and nothing else."""
    jobs = [(label, p, task) for label, p, task in (("com", com, "comp"), ("gen", gen, "gen"), ("fusion", fusion, None))
            if p is not None]
    if not jobs:
        raise ValueError("give at least one of com, gen, fusion")
    targets, tensors = {}, {}
    for label, path, task in jobs:
        targets.update({f"{label}:{k}": t for k, t in release_targets(model, task).items()})
        tensors.update({f"{label}:{k}": t for k, t in _read_release(path).items()})
    files = ", ".join(f"{label}={path}" for label, path, _ in jobs)
    copy_checked(targets, tensors, what=f"release weights ({files}; model unchanged: a plugin file holds exactly its "
                                        f"lora_A/lora_B/lora_route and mm_projector, the fusion file embed_tokens and "
                                        f"lm_head, all under {_RELEASE_PREFIX!r})")
