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
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file

import hlora
from hlora import CheckpointError
from hlora.io import WEIGHTS_NAME as HLORA_WEIGHTS

from healthgpt.model.files import atomic_write, require_file
from healthgpt.model.config import CONFIG_NAME, HealthGPTConfig

__all__ = ["save_model", "load_model", "load_release_weights", "release_to_ours", "CheckpointError"]

TOKENIZER_DIR = "tokenizer"
PLUGINS_DIR = "plugins"
IMAGE_TOKENIZER_DIR = "image_tokenizer"
PROJECTORS_FILE = "projectors.safetensors"
FUSION_FILE = "fusion.safetensors"
LLM_BASE_FILE = "llm_base.safetensors"
VISION_FILE = "vision.safetensors"

_RELEASE_PREFIX = "base_model.model."
_RELEASE_PLUGIN_KEY = re.compile(
    r"(model\.layers\.\d+\.(?:self_attn\.(?:qkv_proj|o_proj)|mlp\.(?:gate_up_proj|down_proj)))\.lora_(A|B|route)\.weight"
)
_RELEASE_PLUGIN_PARTS = {"A": "A", "B": "B", "route": "router"}


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


@torch.no_grad()
def _copy_checked(targets: dict, tensors: dict, source: str) -> None:
    """Copy ``tensors`` into ``targets`` (same keys, same shapes) or raise before copying anything."""
    missing = sorted(set(targets) - set(tensors))
    unexpected = sorted(set(tensors) - set(targets))
    shapes = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(targets[k].shape)}"
              for k in sorted(set(targets) & set(tensors)) if tensors[k].shape != targets[k].shape]
    problems = [f"{label} ({len(v)}): {_listing(v)}" for label, v in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes)) if v]
    if problems:
        raise CheckpointError(f"cannot load {source}: " + " | ".join(problems))
    for k, t in targets.items():
        t.copy_(tensors[k].to(t.dtype))


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
        _copy_checked(_llm_base_state(model), load_file(os.path.join(directory, LLM_BASE_FILE)), LLM_BASE_FILE)
    if data["vision_path"] is None:
        _copy_checked(model.vision.state_dict(keep_vars=True), load_file(os.path.join(directory, VISION_FILE)), VISION_FILE)
    projectors = {f"{t}.{k}": v for t, p in model.projectors.items() for k, v in p.state_dict(keep_vars=True).items()}
    _copy_checked(projectors, load_file(os.path.join(directory, PROJECTORS_FILE)), PROJECTORS_FILE)
    _copy_checked(_fusion_state(model), load_file(os.path.join(directory, FUSION_FILE)), FUSION_FILE)
    hlora.load(model.llm, os.path.join(directory, PLUGINS_DIR))
    return model


# ---- the public release ---------------------------------------------------------------------------


def release_to_ours(key: str, task: str | None) -> tuple | None:
    """A release key -> (part, our key): part ``plugin`` (key in ``hlora.plugin_state_dict``),
    ``projector`` (key in ``projectors[task]``) or ``fusion``; ``None`` when the key is not one of the
    documented ones. ``task`` is the file's plugin (``None`` for the fusion file)."""
    if not key.startswith(_RELEASE_PREFIX):
        return None
    rest = key[len(_RELEASE_PREFIX):]
    if rest == "model.embed_tokens.weight":
        return "fusion", "embed_tokens.weight"
    if rest == "lm_head.weight":
        return "fusion", "lm_head.weight"
    if task is None:
        return None
    m = _RELEASE_PLUGIN_KEY.fullmatch(rest)
    if m:
        return "plugin", f"{m.group(1)}.plugins.{task}.{_RELEASE_PLUGIN_PARTS[m.group(2)]}"
    m = re.fullmatch(r"model\.mm_projector\.([02])\.(weight|bias)", rest)
    if m:
        return "projector", f"{m.group(1)}.{m.group(2)}"
    return None


def _read_release(path: str) -> dict:
    require_file(path, "release weights file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path} with torch.load(weights_only=True): {e}") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return state


@torch.no_grad()
def load_release_weights(model, com: str | None = None, gen: str | None = None, fusion: str | None = None) -> None:
    """Load release files into ``model``. Every file is read and every key and shape checked
    before any value is copied: on any error (unknown, missing or mis-shaped keys, listed) the
    model is unchanged. A plugin file must hold its whole plugin and projector, the fusion file
    ``embed_tokens`` and ``lm_head``, and nothing else."""
    jobs = [(p, task) for p, task in ((com, "comp"), (gen, "gen"), (fusion, None)) if p is not None]
    if not jobs:
        raise ValueError("give at least one of com, gen, fusion")
    copies, problems, fusion_state = [], [], None
    for path, task in jobs:
        state = _read_release(path)
        fusion_state = state if task is None else fusion_state
        if task is None:
            targets = {("fusion", k): v for k, v in _fusion_state(model).items()}
            expected_parts = "embed_tokens and lm_head"
        else:
            plugin = hlora.plugin_state_dict(model.llm, [task])
            proj = model.projectors[task].state_dict(keep_vars=True)
            targets = {**{("plugin", k): v for k, v in plugin.items()}, **{("projector", k): v for k, v in proj.items()}}
            expected_parts = f"the {task} plugin (lora_A/lora_B/lora_route) and mm_projector"
        mapped, unknown = {}, []
        for key, value in state.items():
            ours = release_to_ours(key, task)
            if ours is None or ours not in targets:
                unknown.append(key)
            else:
                mapped[ours] = (key, value)
        missing = [f"{part}:{k}" for part, k in targets if (part, k) not in mapped]
        shapes = [f"{src}: file {tuple(v.shape)} vs model {tuple(targets[ours].shape)}"
                  for ours, (src, v) in mapped.items() if v.shape != targets[ours].shape]
        for label, items in (("unknown keys", unknown), ("missing", missing), ("shape mismatch", shapes)):
            if items:
                problems.append(f"{os.path.basename(path)}: {label} ({len(items)}): {_listing(sorted(items))}")
        if unknown or missing:
            problems.append(f"{os.path.basename(path)} should hold exactly {expected_parts} under {_RELEASE_PREFIX!r}")
        copies += [(targets[ours], v) for ours, (_, v) in mapped.items()]
    emb, head = model.llm.get_input_embeddings().weight, model.llm.get_output_embeddings().weight
    if head is emb and fusion_state is not None and not problems:
        pair = (fusion_state[_RELEASE_PREFIX + "model.embed_tokens.weight"], fusion_state[_RELEASE_PREFIX + "lm_head.weight"])
        if not torch.equal(*pair):
            problems.append("the model ties embed_tokens and lm_head but the fusion file's two matrices differ")
    if problems:
        raise CheckpointError("release weights not loaded (model unchanged): " + " || ".join(problems))
    for target, value in copies:
        target.copy_(value.to(target.dtype))


def _listing(items: list, most: int = 8) -> str:
    return ", ".join(items[:most]) + (f" (+{len(items) - most} more)" if len(items) > most else "")
