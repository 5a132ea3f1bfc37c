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

A save is one transaction (``save_model``): readers see the whole old model or the whole new
one, even after a kill mid-save. The release (``torch.save`` pickles of a PEFT-wrapped LLaVA
model, read here with ``torch.load(weights_only=True)``)::

    base_model.model.model.layers.{N}.{self_attn.qkv_proj|self_attn.o_proj|mlp.gate_up_proj|mlp.down_proj}
        .lora_A.weight [R, d_in] -> A    .lora_B.weight [d_out, R] -> B    .lora_route.weight [k, d_in] -> router
    base_model.model.model.mm_projector.{0,2}.{weight,bias}  -> the file's task projector
    base_model.model.model.embed_tokens.weight, base_model.model.lm_head.weight  (fusion file)

Every load goes through ``hlora.copy_checked``: all keys, shapes and dtypes are checked before
anything is copied.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import save_file

import hlora
from hlora import CheckpointError, copy_checked
from hlora.files import atomic_write
from hlora.io import WEIGHTS_NAME as HLORA_WEIGHTS, read_safetensors

from healthgpt.model.files import check_model_files, read_json, require_file
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
    save_file(state, path, metadata={"format": "pt"})


def _fusion_state(model) -> dict:
    return {
        "embed_tokens.weight": model.llm.get_input_embeddings().weight,
        "lm_head.weight": model.llm.get_output_embeddings().weight,
    }


def _llm_base_state(model) -> dict:
    fusion = {id(t) for t in _fusion_state(model).values()}
    return {k: v for k, v in model.llm.state_dict(keep_vars=True).items() if ".plugins." not in k and id(v) not in fusion}


# ---- one save is one transaction ---------------------------------------------------------------------
#
# A save writes the whole model into DIR/.saving/, fsyncs it and writes .saving/COMPLETE (the commit
# point: the entries it holds). Then each entry is moved into DIR (a folder entry: the old one moved
# aside into .saving first), the config last, and .saving is removed. Every entry is at any moment
# either still in a committed .saving or already in DIR, so a reader who takes each entry from a
# committed .saving when it is there, else from DIR (``_entry``), sees the new model; before the
# commit, the old one. A later save first finishes a committed move, or drops an uncommitted .saving.

MODEL_ENTRIES = (TOKENIZER_DIR, PLUGINS_DIR, PROJECTORS_FILE, FUSION_FILE, IMAGE_TOKENIZER_DIR, LLM_BASE_FILE,
                 VISION_FILE, CONFIG_NAME)  # the config last: it makes a directory a model
SAVING_DIR = ".saving"
COMMIT_FILE = "COMPLETE"
RUN_FILES = ("run_config.json", "stage.json")  # healthgpt.training.run's RUN_FILE and STAGE_FILE


def _committed_entries(directory: str) -> list | None:
    """The entries of a committed, not yet fully moved save in ``directory`` (None: there is none)."""
    path = os.path.join(directory, SAVING_DIR, COMMIT_FILE)
    return read_json(path, "save journal")["entries"] if os.path.isfile(path) else None


def _entry(directory: str, name: str) -> str:
    """Where a reader finds model entry ``name`` of ``directory`` (module comment above)."""
    staged = os.path.join(directory, SAVING_DIR, name)
    if _committed_entries(directory) is not None and os.path.exists(staged):
        return staged
    return os.path.join(directory, name)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _install(directory: str) -> None:
    """Move a committed save's entries from ``.saving`` into ``directory`` (idempotent: a move that a
    kill interrupted is finished by the next call), then drop ``.saving`` and stale entries."""
    staging = os.path.join(directory, SAVING_DIR)
    entries = _committed_entries(directory)
    for name in entries:
        new, final = os.path.join(staging, name), os.path.join(directory, name)
        if not os.path.exists(new):
            continue  # moved before a kill
        if os.path.isdir(new) and os.path.exists(final):  # rename cannot replace a non-empty folder
            old = os.path.join(staging, ".old-" + name)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(new, final)
    _fsync(directory)
    for name in MODEL_ENTRIES:
        if name not in entries and os.path.isfile(os.path.join(directory, name)):
            os.remove(os.path.join(directory, name))  # e.g. llm_base.safetensors of an earlier random-base save
    shutil.rmtree(staging)


def _recover(directory: str) -> None:
    """Before a new save: finish a committed save a kill interrupted, or drop an uncommitted one."""
    if _committed_entries(directory) is not None:
        _install(directory)
    shutil.rmtree(os.path.join(directory, SAVING_DIR), ignore_errors=True)


def save_model(model, directory: str | os.PathLike) -> str:
    """Write ``model`` to ``directory`` in our format (module docstring) as one transaction (the
    comment above): a reader, even after a kill at any point of the save, sees the whole previous
    model or the whole new one, never a mix. Other files in ``directory`` are left alone."""
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    _recover(directory)
    staging = os.path.join(directory, SAVING_DIR)
    os.makedirs(staging)
    model.tokenizer.save_pretrained(os.path.join(staging, TOKENIZER_DIR))
    hlora.save(model.llm, os.path.join(staging, PLUGINS_DIR))
    _save_tensors({f"{t}.{k}": v for t, p in model.projectors.items() for k, v in p.state_dict().items()},
                  os.path.join(staging, PROJECTORS_FILE))
    _save_tensors(_fusion_state(model), os.path.join(staging, FUSION_FILE))
    model.image_tokenizer.save_pretrained(os.path.join(staging, IMAGE_TOKENIZER_DIR))
    if model.healthgpt_config.llm_path is None:
        _save_tensors(_llm_base_state(model), os.path.join(staging, LLM_BASE_FILE))
    if model.healthgpt_config.vision_path is None:
        _save_tensors(model.vision.state_dict(), os.path.join(staging, VISION_FILE))
    with open(os.path.join(staging, CONFIG_NAME), "w", encoding="utf-8") as f:
        f.write(model.healthgpt_config.to_json())
    for root, _, names in os.walk(staging):
        for name in names:
            _fsync(os.path.join(root, name))
    entries = [name for name in MODEL_ENTRIES if os.path.exists(os.path.join(staging, name))]
    atomic_write(os.path.join(staging, COMMIT_FILE), json.dumps({"entries": entries}))  # the commit point
    _install(directory)
    return directory


def _refuse_unfinished_run(directory: str) -> None:
    """A training run's folder whose stage did not finish is not a model to load (its files, if any,
    are from before the run); say so and how to continue it."""
    run_config, stage = (os.path.join(directory, name) for name in RUN_FILES)
    if not os.path.isfile(run_config):
        return
    if os.path.isfile(stage) and read_json(stage, "stage summary").get("complete"):
        return
    raise CheckpointError(f"{directory} is an unfinished training run (killed or still running: no complete "
                          f"{RUN_FILES[1]}): continue it with `healthgpt train` and the same options plus "
                          f"`--resume`, or use the model it started from")


def load_model(cls, directory: str | os.PathLike, **overrides):
    """Build the model a ``save_model`` directory describes and load its weights. Every file is
    checked before the model is built (empty, truncated or invalid files are named); tensors go
    through ``copy_checked`` (keys, shapes, dtypes, no NaN/Inf)."""
    directory = os.fspath(directory)
    _refuse_unfinished_run(directory)
    config_path = _entry(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        if os.path.isdir(os.path.join(directory, SAVING_DIR)):
            raise CheckpointError(f"{directory} holds only an interrupted save (no complete model): save it again")
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a HealthGPT weights directory "
                                f"(see HealthGPT.save_pretrained)")
    try:
        data = HealthGPTConfig.from_dict(read_json(config_path, "HealthGPT config")).to_dict()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"HealthGPT config {config_path}: {e}") from None
    data.update(overrides)
    paths = {name: _entry(directory, name) for name in MODEL_ENTRIES}
    data["tokenizer_path"] = paths[TOKENIZER_DIR]
    data["image_tokenizer_path"] = paths[IMAGE_TOKENIZER_DIR]
    needed = [PROJECTORS_FILE, FUSION_FILE, PLUGINS_DIR, TOKENIZER_DIR, IMAGE_TOKENIZER_DIR]
    needed += [LLM_BASE_FILE] if data["llm_path"] is None else []
    needed += [VISION_FILE] if data["vision_path"] is None else []
    require_file(os.path.join(paths[PLUGINS_DIR], HLORA_WEIGHTS), "HealthGPT weights file")
    for name in needed:
        if not os.path.exists(paths[name]):
            raise FileNotFoundError(f"HealthGPT weights file {paths[name]!r} does not exist")
        check_model_files(paths[name], "HealthGPT weights")
    model = cls(HealthGPTConfig.from_dict(data))
    if data["llm_path"] is None:
        copy_checked(_llm_base_state(model), read_safetensors(paths[LLM_BASE_FILE])[0], what=paths[LLM_BASE_FILE])
    if data["vision_path"] is None:
        copy_checked(model.vision.state_dict(keep_vars=True), read_safetensors(paths[VISION_FILE])[0],
                     what=paths[VISION_FILE])
    projectors = {f"{t}.{k}": v for t, p in model.projectors.items() for k, v in p.state_dict(keep_vars=True).items()}
    copy_checked(projectors, read_safetensors(paths[PROJECTORS_FILE])[0], what=paths[PROJECTORS_FILE])
    copy_checked(_fusion_state(model), read_safetensors(paths[FUSION_FILE])[0], what=paths[FUSION_FILE])
    hlora.load(model.llm, paths[PLUGINS_DIR])
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
