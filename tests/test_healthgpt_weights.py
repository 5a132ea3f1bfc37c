"""Weights: our directory format, local base checkpoints, and the public release's .bin layout."""

import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import hlora
from healthgpt import HealthGPT, HealthGPTConfig
from healthgpt.model.weights import CheckpointError


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in hlora.adapter_layers(model.llm):
            for p in layer.plugins.values():
                for t in (p.A, p.B, p.router):
                    t.copy_(_bf16(torch.randn(t.shape, generator=g) * 0.05))
        for proj in model.projectors.values():
            for t in proj.parameters():
                t.copy_(_bf16(torch.randn(t.shape, generator=g) * 0.05))
        for w in (model.llm.get_input_embeddings().weight, model.llm.get_output_embeddings().weight):
            w.copy_(_bf16(torch.randn(w.shape, generator=g) * 0.05))
    return model


def _bf16(t):
    """Values a bf16 round trip (the release's dtype) keeps exactly."""
    return t.to(torch.bfloat16).float()


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(1)
    return _randomize(HealthGPT("tiny").eval(), seed=1)


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(2)
    return HealthGPT("tiny").eval()


def _image(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (56, 56, 3), dtype=np.uint8))


def _logits(model):
    batch = model.collate([
        model.prepare_sample([{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}], "comp", image=_image(0)),
        model.prepare_sample([{"from": "human", "value": "<image>\nMRI?"}], "gen", image=_image(1),
                             target=torch.arange(1024) % 8192),
    ])
    with torch.no_grad():
        return model(**batch).logits


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- our format ------------------------------------------------------------------------------------


def test_save_and_load_round_trip(source, tmp_path):
    source.save_pretrained(tmp_path / "w")
    names = sorted(os.listdir(tmp_path / "w"))
    assert names == sorted(["healthgpt_config.json", "tokenizer", "plugins", "projectors.safetensors", "fusion.safetensors",
                            "image_tokenizer", "llm_base.safetensors", "vision.safetensors"])
    assert not [n for n in os.listdir(tmp_path / "w") if n.startswith(".tmp-")]
    loaded = HealthGPT.from_pretrained(tmp_path / "w").eval()
    a, b = _state(source), _state(loaded)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    torch.testing.assert_close(_logits(loaded), _logits(source))
    assert len(loaded.tokenizer) == len(source.tokenizer)


def test_missing_weights_file_is_a_clear_error(source, tmp_path):
    source.save_pretrained(tmp_path / "w")
    os.remove(tmp_path / "w" / "fusion.safetensors")
    with pytest.raises(FileNotFoundError, match="fusion.safetensors"):
        HealthGPT.from_pretrained(tmp_path / "w")
    with pytest.raises(FileNotFoundError, match="not a HealthGPT weights directory"):
        HealthGPT.from_pretrained(tmp_path / "nothing")


def test_base_checkpoints_from_local_directories(tmp_path):
    """Real presets read the LLM, tokenizer and CLIP from local directories and save only paths."""
    from transformers import CLIPConfig, CLIPModel, Phi3Config, Phi3ForCausalLM

    from healthgpt.model.config import TINY_CLIP, TINY_PHI3
    from healthgpt.model.tokenizer import load_base_tokenizer

    torch.manual_seed(3)
    base = Phi3ForCausalLM(Phi3Config(**TINY_PHI3))
    base.save_pretrained(tmp_path / "phi3")
    load_base_tokenizer(None).save_pretrained(tmp_path / "phi3")
    # a full CLIP checkpoint, as openai/clip-vit-large-patch14-336 is, with its preprocessor config
    clip = CLIPModel(CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=4, vocab_size=99),
                                vision_config=TINY_CLIP, projection_dim=32))
    clip.save_pretrained(tmp_path / "clip")
    (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 56, "width": 56}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}))
    config = HealthGPTConfig.preset("tiny", llm_path=str(tmp_path / "phi3"), vision_path=str(tmp_path / "clip"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the full CLIP's text half is expected, not warned about
        model = HealthGPT(config)
    assert torch.equal(model.llm.model.layers[0].mlp.down_proj.weight, base.model.layers[0].mlp.down_proj.weight)
    assert torch.equal(model.llm.model.embed_tokens.weight[:32011], base.model.embed_tokens.weight)
    assert torch.equal(model.vision.encoder.layers[0].mlp.fc1.weight, clip.vision_model.encoder.layers[0].mlp.fc1.weight)
    assert model.image_processor.mean == (0.5, 0.5, 0.5) and model.image_processor.size == 56
    assert len(model.tokenizer) == 40206
    model.save_pretrained(tmp_path / "w")
    assert not os.path.exists(tmp_path / "w" / "llm_base.safetensors")
    assert not os.path.exists(tmp_path / "w" / "vision.safetensors")
    assert HealthGPTConfig.load(tmp_path / "w").llm_path == str(tmp_path / "phi3")
    again = HealthGPT.from_pretrained(tmp_path / "w")
    torch.testing.assert_close(_logits(again), _logits(model))


def test_base_checkpoint_with_missing_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import Phi3Config, Phi3ForCausalLM

    from healthgpt.model.config import TINY_PHI3

    from healthgpt.model.tokenizer import load_base_tokenizer

    Phi3ForCausalLM(Phi3Config(**TINY_PHI3)).save_pretrained(tmp_path / "phi3")
    load_base_tokenizer(None).save_pretrained(tmp_path / "phi3")
    weights = tmp_path / "phi3" / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks or mis-shapes 1 weights: model.layers.1.mlp.down_proj.weight"):
        HealthGPT(HealthGPTConfig.preset("tiny", llm_path=str(tmp_path / "phi3")))


def test_missing_base_directories_say_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"LLM directory .*does not exist: expected a local copy of microsoft/Phi-3-mini"):
        HealthGPT(HealthGPTConfig.preset("m3", llm_path=str(tmp_path / "phi3")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        HealthGPT(HealthGPTConfig.preset("m3", llm_path=str(tmp_path / "empty")))
    with pytest.raises(FileNotFoundError, match=r"vision tower directory .*clip-vit-large-patch14-336"):
        HealthGPT(HealthGPTConfig.preset("tiny", vision_path=str(tmp_path / "clip")))
    with pytest.raises(FileNotFoundError, match="convert-vqgan"):
        HealthGPT(HealthGPTConfig.preset("tiny", image_tokenizer_path=str(tmp_path / "vq")))


# ---- the public release -----------------------------------------------------------------------------


def _release_files(model, directory):
    """The release layout (reference.md section 3), written from ``model`` by the documented key names."""
    files = {}
    for task, name in (("comp", "com_hlora_weights.bin"), ("gen", "gen_hlora_weights.bin")):
        state = {}
        for path, module in model.llm.named_modules():
            if isinstance(module, hlora.AdapterLayer):
                p = module.plugins[task]
                for ours, theirs in (("A", "lora_A"), ("B", "lora_B"), ("router", "lora_route")):
                    state[f"base_model.model.{path}.{theirs}.weight"] = getattr(p, ours).detach().to(torch.bfloat16)
        for i in (0, 2):
            for wb in ("weight", "bias"):
                state[f"base_model.model.model.mm_projector.{i}.{wb}"] = getattr(model.projectors[task][i], wb).detach().to(torch.bfloat16)
        files[task] = state
    files["fusion"] = {
        "base_model.model.model.embed_tokens.weight": model.llm.get_input_embeddings().weight.detach().to(torch.bfloat16),
        "base_model.model.lm_head.weight": model.llm.get_output_embeddings().weight.detach().to(torch.bfloat16),
    }
    paths = {}
    for key, state in files.items():
        paths[key] = str(directory / f"{key}.bin")
        torch.save(state, paths[key])
    return files, paths


def test_release_weights_load(source, target, tmp_path):
    files, paths = _release_files(source, tmp_path)
    assert "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight" in files["comp"]
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_route.weight" in files["gen"]
    target.load_release_weights(com=paths["comp"], gen=paths["gen"], fusion=paths["fusion"])
    want, got = _state(source), _state(target)
    loaded = [k for k in want if ".plugins." in k or k.startswith("projectors.") or k.endswith(("embed_tokens.weight", "lm_head.weight"))]
    assert len(loaded) == 2 * (2 * 4 * 3 + 4) + 2  # 2 plugins x 2 layers x 4 linears x (A, B, router) + projectors, + fusion
    for k in loaded:
        assert torch.equal(got[k], want[k]), k
    # the base LLM and CLIP differ (other seeds), so compare what the loaded parts compute on one base
    with torch.no_grad():
        for k in want:
            if k not in loaded:
                target.state_dict()[k].copy_(want[k])
    torch.testing.assert_close(_logits(target), _logits(source))


def _broken(files, tmp_path, part, edit):
    state = dict(files[part])
    edit(state)
    path = str(tmp_path / f"broken_{part}.bin")
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    "part, edit, message",
    [
        ("comp", lambda s: s.pop("base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"),
         r"missing keys \(1\): com:base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"),
        ("comp", lambda s: s.__setitem__("base_model.model.model.vision_tower.weight", torch.zeros(1)),
         r"unexpected keys \(1\): com:base_model.model.model.vision_tower.weight"),
        ("gen", lambda s: s.__setitem__("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight", torch.zeros(3, 128)),
         r"shape mismatch .*down_proj.lora_A.weight: file \(3, 128\) vs model \(16, 128\)"),
        ("comp", lambda s: [s.__setitem__(k.replace("base_model.model.", "base_model."), s.pop(k)) for k in list(s)],
         r"unexpected keys \(\d+\): com:base_model.model.layers"),
        ("fusion", lambda s: s.__setitem__("base_model.model.model.embed_tokens.weight", torch.zeros(32064, 64)),
         r"embed_tokens.weight: file \(32064, 64\) vs model \(40206, 64\)"),
    ],
)
def test_broken_release_files_fail_cleanly(source, target, tmp_path, part, edit, message):
    files, paths = _release_files(source, tmp_path)
    paths[part] = _broken(files, tmp_path, part, edit)
    before = _state(target)
    with pytest.raises(CheckpointError, match=message):
        target.load_release_weights(com=paths["comp"], gen=paths["gen"], fusion=paths["fusion"])
    after = _state(target)
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_gen_file_in_the_comp_slot_is_refused(source, target, tmp_path):
    _, paths = _release_files(source, tmp_path)
    before = _state(target)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        target.load_release_weights(com=paths["gen"])
    with pytest.raises(CheckpointError, match="unexpected keys"):
        target.load_release_weights(fusion=paths["comp"])
    (tmp_path / "junk.bin").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot read"):
        target.load_release_weights(com=str(tmp_path / "junk.bin"))
    assert all(torch.equal(v, _state(target)[k]) for k, v in before.items())
