"""The memory-on-paper function: parameter counts against the real modules, strategy arithmetic by hand."""

import os

import pytest
import torch

import hlora
from healthgpt.constants import TASKS
from healthgpt.model.config import CLIP_VIT_L14_336, MODEL_PRESETS, VQGAN_OPENIMAGES_F8_8192
from healthgpt.training import memory
from healthgpt.training.memory import GIB, parameter_counts, per_gpu_bytes


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("model", ["m3", "l14"])
def test_counts_match_the_real_modules(model):
    """Closed-form counts = the transformers / hlora modules built on the meta device (no memory)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    from healthgpt.model.vision import build_projector

    counts = parameter_counts(model)
    preset = MODEL_PRESETS[model]
    with torch.device("meta"):
        llm = Phi3ForCausalLM(Phi3Config(**preset["llm_config"]))
        llm.resize_token_embeddings(counts.vocab, mean_resizing=False)
        assert _numel(llm) == counts.llm_base
        layer_base = _numel(llm.model.layers[0])
        hlora.inject(llm, hlora.HLoRAConfig(plugins=preset["plugins"], target_modules="all-linear"))
        for task in TASKS:
            assert sum(p.numel() for n, p in llm.named_parameters() if f".plugins.{task}." in n) == counts.plugins[task]
        assert _numel(llm.model.layers[0]) == counts.layer_unit > layer_base
        projector = build_projector(CLIP_VIT_L14_336["hidden_size"], counts.hidden, torch.bfloat16)
        assert _numel(projector) == counts.projectors["comp"] == counts.projectors["gen"]
    assert counts.vocab == llm.get_input_embeddings().weight.shape[0] == llm.lm_head.weight.shape[0]
    if model == "m3":
        assert counts.vocab == 40206  # reference.md: the M3 vocabulary after the 8195 generation tokens


def test_vision_and_image_tokenizer_counts():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from healthgpt.model.vq import VQTokenizer

    counts = parameter_counts("m3")
    with torch.device("meta"):
        assert _numel(CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_L14_336))) == counts.vision
        assert _numel(VQTokenizer(VQGAN_OPENIMAGES_F8_8192)) == counts.image_tokenizer


@pytest.mark.parametrize("model", ["m3", "l14"])
def test_strategy_arithmetic(model):
    counts = parameter_counts(model)
    trainable = counts.trainable()
    weights = (counts.total - counts.image_tokenizer) * 2 + counts.image_tokenizer * 4
    ddp = {n: per_gpu_bytes(model, "ddp", n) for n in (1, 2, 8)}
    for n in (1, 2, 8):
        # DDP: every GPU holds everything; gradients bf16 and Adam (fp32 master, m, v) for trainable parts only
        assert ddp[n]["weights"] == weights
        assert ddp[n]["gradients"] == 2 * trainable
        assert ddp[n]["optimizer"] == 12 * trainable
        z2, z3, fsdp = (per_gpu_bytes(model, s, n) for s in ("zero2", "zero3", "fsdp"))
        assert z2["weights"] == weights
        assert z2["gradients"] == pytest.approx(2 * trainable / n) and z2["optimizer"] == pytest.approx(12 * trainable / n)
        assert z3["weights"] == pytest.approx(weights / n)
        assert z3["gradients"] == z2["gradients"] and z3["optimizer"] == z2["optimizer"]
        assert fsdp == z3
        for b in (ddp[n], z2, z3):
            assert b["activations"] == ddp[1]["activations"]  # per-GPU micro-batch: N does not change it
            assert b["total"] == pytest.approx(sum(v for k, v in b.items() if k != "total"))
        # sharding the parameters pays two gathered layers and the root unit in flight
        assert z3["gathered"] == (0 if n == 1 else (counts.root_unit + 2 * counts.layer_unit) * 2)
    assert per_gpu_bytes(model, "zero3", 1)["total"] == ddp[1]["total"]  # one GPU: nothing to shard
    assert per_gpu_bytes(model, "zero3", 8)["total"] < per_gpu_bytes(model, "zero2", 8)["total"] < ddp[8]["total"]


def test_activations_by_hand():
    """Checkpointed activations of M3 at 4 x 2048 tokens, from the shapes in the docstring."""
    T, H, I, L, V = 8192, 3072, 8192, 32, 40206
    saved = L * T * H * 2
    layer = T * (6 * H + 2 * H + 3 * I + 4 * (2 * 256 + 4)) * 2  # M3's widest plugin: gen, R=256, k=4
    assert memory.activation_bytes(parameter_counts("m3"), T, MODEL_PRESETS["m3"]["plugins"]) == saved + layer + T * V * 12
    # one plugin trains in a single-task stage 3: fewer gradients and Adam states, same weights
    comp = per_gpu_bytes("m3", "ddp", 1, tasks=("comp",))
    assert comp["optimizer"] == 12 * (parameter_counts("m3").plugins["comp"] + parameter_counts("m3").projectors["comp"])
    assert comp["weights"] == per_gpu_bytes("m3", "ddp", 1)["weights"]


def test_fits_and_the_readme_table():
    assert memory.fits(0.9 * 80 * GIB) and not memory.fits(0.9 * 80 * GIB + 1)
    table = memory.memory_table()
    assert len(table.splitlines()) == 2 + 2 * 3 * 3
    readme = os.path.join(os.path.dirname(memory.__file__), "configs", "README.md")
    assert table in open(readme).read(), "configs/README.md's table is stale: python -m healthgpt.training.memory"


def test_bad_arguments():
    with pytest.raises(ValueError, match="strategy"):
        per_gpu_bytes("m3", "zero4", 2)
    with pytest.raises(ValueError, match="n_gpus"):
        per_gpu_bytes("m3", "ddp", 0)
    with pytest.raises(ValueError, match="model"):
        per_gpu_bytes("llama", "ddp", 1)
