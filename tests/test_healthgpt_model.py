"""HealthGPT model on the tiny preset: config, vocabulary, samples, forward/backward, the hard router."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import hlora
from healthgpt import IGNORE_INDEX, IMAGE_TOKEN_INDEX, HealthGPT, HealthGPTConfig
from healthgpt.model.config import CONFIG_NAME, TINY_PHI3, _plugins
from healthgpt.model.tokenizer import load_base_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = HealthGPT(HealthGPTConfig.preset("tiny", plugins=_plugins(8, 16, dropout=0.0)))
    with torch.no_grad():  # make every plugin and the new vocabulary rows non-trivial
        for layer in hlora.adapter_layers(m.llm):
            for p in layer.plugins.values():
                p.B.normal_(0, 0.05)
        for w in (m.llm.get_input_embeddings().weight, m.llm.get_output_embeddings().weight):
            w[m.gen_vocab.base_size:] += torch.randn_like(w[m.gen_vocab.base_size:]) * 0.1
    return m


def _image(seed, w=40, h=60):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


COMP_CONV = [{"from": "human", "value": "<image>\nWhat organ is shown?"}, {"from": "gpt", "value": "The liver."}]
GEN_CONV = [{"from": "human", "value": "<image>\nConvert this CT to an MRI."}]


def _batch(model, tasks):
    samples = []
    for i, t in enumerate(tasks):
        if t == "comp":
            samples.append(model.prepare_sample(COMP_CONV, "comp", image=_image(i)))
        else:
            codes = torch.randint(0, 8192, (model.num_image_codes,), generator=torch.Generator().manual_seed(i))
            samples.append(model.prepare_sample(GEN_CONV, "gen", image=_image(i), target=codes))
    return model.collate(samples)


# ---- config ---------------------------------------------------------------------------------------


def test_presets_and_overrides():
    m3 = HealthGPTConfig.preset("m3")
    assert m3.plugins["comp"]["rank"] == 64 and m3.plugins["gen"]["rank"] == 256
    assert {p["num_experts"] for p in m3.plugins.values()} == {4}
    assert all(p["alpha"] / (p["rank"] / p["num_experts"]) == 8 for p in m3.plugins.values())
    assert m3.visual_layers == {"comp": -2, "gen": 1}
    assert m3.vision_config["image_size"] == 336 and m3.llm_config["hidden_size"] == 3072
    l14 = HealthGPTConfig.preset("l14")
    assert l14.template == "phi4" and l14.llm_config["hidden_size"] == 5120 and l14.plugins["comp"]["rank"] == 32
    custom = HealthGPTConfig.preset("m3", visual_layers={"comp": -3, "gen": 2}, dtype="float32")
    assert custom.visual_layers["comp"] == -3 and custom.dtype == "float32"
    with pytest.raises(ValueError, match="unknown preset"):
        HealthGPTConfig.preset("xl")
    with pytest.raises(ValueError, match="unknown HealthGPTConfig fields"):
        HealthGPTConfig.preset("tiny", lora_rank=3)
    with pytest.raises(ValueError, match="tasks"):
        HealthGPTConfig.preset("tiny", visual_layers={"comp": -2})


def _as_json(value):
    return json.loads(json.dumps(value))


def test_config_save_then_load_keeps_every_field(tmp_path):
    """The file ``save_pretrained`` writes (``to_json`` as ``CONFIG_NAME``), loaded back, equals the
    original field by field, non-default values included."""
    plugins = _plugins(12, 20, dropout=0.05)
    plugins["gen"]["num_experts"] = 2
    original = HealthGPTConfig.preset("m3", visual_layers={"comp": -3, "gen": 2}, dtype="float32", plugins=plugins,
                                      attn_implementation="eager", llm_path="/models/phi3", template="phi4")
    default = HealthGPTConfig.preset("m3")
    changed = [f.name for f in dataclasses.fields(HealthGPTConfig) if getattr(original, f.name) != getattr(default, f.name)]
    assert set(changed) == {"visual_layers", "dtype", "plugins", "attn_implementation", "llm_path", "template"}
    (tmp_path / CONFIG_NAME).write_text(original.to_json())
    loaded = HealthGPTConfig.load(tmp_path)
    assert loaded is not original
    for f in dataclasses.fields(HealthGPTConfig):  # JSON has no tuples: (128, 256) comes back as [128, 256]
        assert _as_json(getattr(loaded, f.name)) == _as_json(getattr(original, f.name)), f.name
    assert loaded.plugins["gen"]["num_experts"] == 2 and loaded.visual_layers == {"comp": -3, "gen": 2}
    with pytest.raises(FileNotFoundError, match="not a HealthGPT weights directory"):
        HealthGPTConfig.load(tmp_path / "elsewhere")


def test_structure(model):
    from transformers import CLIPVisionModel, Phi3ForCausalLM

    assert isinstance(model.vision, CLIPVisionModel) and isinstance(model.llm, Phi3ForCausalLM)
    assert model.llm.config._attn_implementation == "sdpa"
    adapted = {n for n, m in model.named_modules() if isinstance(m, hlora.AdapterLayer)}
    assert adapted and all(n.startswith("llm.model.layers.") for n in adapted)
    kinds = {n.rsplit(".", 1)[-1] for n in adapted}
    assert kinds == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert not isinstance(model.llm.lm_head, hlora.AdapterLayer)
    layer = model.llm.model.layers[0].self_attn.qkv_proj
    assert set(layer.plugins) == {"comp", "gen"}
    assert layer.plugins["comp"].A.shape[0] == 8 and layer.plugins["gen"].A.shape[0] == 16
    proj = model.projectors["comp"]
    assert [type(m).__name__ for m in proj] == ["Linear", "GELU", "Linear"]
    assert proj[0].in_features == model.vision.config.hidden_size and proj[2].out_features == model.llm.config.hidden_size
    assert model.num_image_tokens == (56 // 14) ** 2


def test_vocabulary_grows_by_8195_with_mean_rows(model):
    base = len(load_base_tokenizer(None))
    assert base == TINY_PHI3["vocab_size"] == 32011
    assert len(model.tokenizer) == base + 8195 == 40206
    assert model.llm.config.vocab_size == 40206
    assert model.tokenizer.convert_ids_to_tokens([base, base + 1, base + 8192, base + 8193, base + 8194]) == [
        "<start_index>", "<idx_0>", "<idx_8191>", "<end_index>", "<pixel_newline>"]
    torch.manual_seed(0)
    fresh = HealthGPT("tiny")
    for w in (fresh.llm.get_input_embeddings().weight, fresh.llm.get_output_embeddings().weight):
        assert w.shape == (40206, 64)
        mean = w[:base].mean(0)
        torch.testing.assert_close(w[base:], mean.expand(8195, -1), rtol=0, atol=1e-6)


# ---- samples --------------------------------------------------------------------------------------


def test_prepare_sample_comp_labels(model):
    s = model.prepare_sample(COMP_CONV, "comp", image=_image(0))
    ids, labels = s["input_ids"], s["labels"]
    assert ids.shape == labels.shape and s["task"] == "comp" and s["images"].shape == (1, 3, 56, 56)
    assert (ids == IMAGE_TOKEN_INDEX).sum() == model.num_image_tokens
    assert (labels[ids == IMAGE_TOKEN_INDEX] == IGNORE_INDEX).all()
    supervised = ids[labels != IGNORE_INDEX].tolist()
    assert model.tokenizer.decode(supervised) == "The liver.<|end|>"
    text = model.tokenizer.decode(ids[ids >= 0].tolist())
    # (the LLaMA BPE puts a word-start mark before each text piece: decoded as a space)
    assert text.replace(" \n", "\n") == (
        "<s><|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n\nWhat organ is shown?<|end|>"
        "\n<|assistant|>\nThe liver.<|end|>"
    )


def test_prepare_sample_gen_answer_is_1024_codes(model):
    codes = torch.arange(model.num_image_codes) * 7 % 8192
    s = model.prepare_sample(GEN_CONV, "gen", image=_image(1), target=codes)
    sup = s["labels"][s["labels"] != IGNORE_INDEX]
    v = model.gen_vocab
    assert sup[0] == v.start and sup[-2] == v.end and sup[-1] == model.tokenizer.convert_tokens_to_ids("<|end|>")
    assert torch.equal(sup[1:-2], codes + v.code0)
    # a target image is encoded by the image tokenizer
    s2 = model.prepare_sample(GEN_CONV, "gen", image=_image(1), target=_image(2, 64, 64))
    assert (s2["labels"] != IGNORE_INDEX).sum() == model.num_image_codes + 3


def test_prepare_sample_errors(model):
    with pytest.raises(ValueError, match="placeholders"):
        model.prepare_sample(COMP_CONV, "comp")
    with pytest.raises(ValueError, match="target"):
        model.prepare_sample(GEN_CONV, "gen", image=_image(0))
    with pytest.raises(ValueError, match="end with the user"):
        model.prepare_sample(COMP_CONV, "gen", image=_image(0), target=torch.zeros(1024, dtype=torch.long))
    with pytest.raises(ValueError, match="alternate"):
        model.prepare_sample([{"from": "gpt", "value": "hi"}], "comp")
    with pytest.raises(ValueError, match="unknown task"):
        model.prepare_sample(COMP_CONV, "segment", image=_image(0))
    with pytest.raises(ValueError, match="cut an image"):
        model.prepare_sample(COMP_CONV, "comp", image=_image(0), max_length=20)
    # no <image> with one image: the placeholder goes before the first turn
    s = model.prepare_sample([{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}], "comp", image=_image(0))
    assert (s["input_ids"] == IMAGE_TOKEN_INDEX).sum() == model.num_image_tokens


# ---- forward / backward ----------------------------------------------------------------------------


@pytest.mark.parametrize("tasks", [["comp", "comp"], ["gen", "gen"], ["comp", "gen", "comp"]])
def test_forward_backward(model, tasks):
    batch = _batch(model, tasks)
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    assert out.logits.shape == (len(tasks), batch["input_ids"].shape[1], 40206)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {t: model.llm.model.layers[0].mlp.down_proj.plugins[t].A.grad for t in ("comp", "gen")}
    for t in ("comp", "gen"):
        used = t in tasks
        assert (grads[t] is not None and grads[t].abs().sum() > 0) == used, t
        pg = model.projectors[t][0].weight.grad
        assert (pg is not None and pg.abs().sum() > 0) == used, t
    assert all(p.grad is None for p in model.vision.parameters())
    model.eval()


def test_mixed_batch_equals_separate_batches(model):
    batch = _batch(model, ["comp", "gen", "comp"])
    with torch.no_grad():
        mixed = model(**batch).logits
        for b, t in enumerate(batch["tasks"]):
            n = int(batch["attention_mask"][b].sum())
            pix = batch["images"][b : b + 1]
            alone = model(input_ids=batch["input_ids"][b : b + 1, :n], images=pix, tasks=t).logits
            torch.testing.assert_close(mixed[b, :n], alone[0], rtol=1e-4, atol=1e-4)
    # routing really differs: the same sample through the other plugin gives other logits
    with torch.no_grad():
        n = int(batch["attention_mask"][0].sum())
        other = model(input_ids=batch["input_ids"][:1, :n], images=batch["images"][:1], tasks="gen").logits
    assert not torch.allclose(other[0], mixed[0, :n], atol=1e-3)


def test_each_task_reads_its_clip_layer_and_projector(model):
    pix = model.image_processor([_image(3), _image(4)])
    with torch.no_grad():
        states = model.vision(pix, output_hidden_states=True).hidden_states
        feats = model.encode_images(pix, ["comp", "gen"])
        want_comp = model.projectors["comp"](states[-2][:1, 1:])
        want_gen = model.projectors["gen"](states[1][1:, 1:])
    torch.testing.assert_close(feats[0], want_comp[0])
    torch.testing.assert_close(feats[1], want_gen[0])
    assert not torch.allclose(states[-2], states[1])
    # the image features land on the image positions, in order
    batch = _batch(model, ["gen", "comp"])
    with torch.no_grad():
        emb = model.embed_inputs(batch["input_ids"], batch["images"], batch["tasks"])
        feats = model.encode_images(batch["images"], batch["tasks"])
    for b in range(2):
        pos = batch["input_ids"][b] == IMAGE_TOKEN_INDEX
        torch.testing.assert_close(emb[b, pos], feats[b])


def test_switching_projector_weights_only_affects_its_task(model):
    batch = _batch(model, ["comp", "gen"])
    with torch.no_grad():
        before = model(**batch).logits
        saved = model.projectors["gen"][2].bias.clone()
        model.projectors["gen"][2].bias.add_(1.0)
        after = model(**batch).logits
        model.projectors["gen"][2].bias.copy_(saved)
    torch.testing.assert_close(after[0], before[0])
    assert not torch.allclose(after[1], before[1])


def test_gradient_checkpointing_keeps_routing(model):
    batch = _batch(model, ["comp", "gen"])

    def grads():
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    try:
        plain = grads()
        model.gradient_checkpointing_enable()  # the name older HF Trainers call
        assert model.is_activation_checkpointing
        ckpt = grads()
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
    assert plain.keys() == ckpt.keys() and any(".plugins.gen." in n for n in plain)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-4, atol=1e-6)


def test_set_trainable(model):
    try:
        model.set_trainable(plugins=["gen"], projectors=[], fusion=True)
        names = set(hlora.trainable_parameters(model))
        assert any(".plugins.gen." in n for n in names) and not any(".plugins.comp." in n for n in names)
        assert "llm.model.embed_tokens.weight" in names and "llm.lm_head.weight" in names
        assert not any(n.startswith(("projectors.", "vision.", "image_tokenizer.")) for n in names)
    finally:
        model.set_trainable(plugins=["comp", "gen"], projectors=["comp", "gen"])


def test_forward_input_errors(model):
    batch = _batch(model, ["comp"])
    with pytest.raises(ValueError, match="tasks is required"):
        model(input_ids=batch["input_ids"], images=batch["images"])
    with pytest.raises(ValueError, match="no images"):
        model(input_ids=batch["input_ids"], tasks="comp")
    with pytest.raises(ValueError, match="2 images"):
        model(input_ids=batch["input_ids"], images=torch.cat([batch["images"]] * 2), tasks="comp")
    with pytest.raises(ValueError, match="tasks for a batch"):
        model(input_ids=batch["input_ids"], images=batch["images"], tasks=["comp", "gen"])


def test_hf_trainer_trains_both_plugins_in_mixed_batches(model, tmp_path):
    from transformers import Trainer, TrainingArguments

    data = [model.prepare_sample(COMP_CONV, "comp", image=_image(0)),
            model.prepare_sample(GEN_CONV, "gen", image=_image(1), target=torch.zeros(model.num_image_codes, dtype=torch.long))]
    layer = model.llm.model.layers[1].self_attn.o_proj
    before = {t: layer.plugins[t].B.detach().clone() for t in ("comp", "gen")}
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, report_to=[], use_cpu=True,
        remove_unused_columns=False, activation_checkpointing=True, save_strategy="no", learning_rate=1e-3,
    )
    try:
        result = Trainer(model=model, args=args, train_dataset=data, data_collator=model.collate).train()
    finally:
        model.activation_checkpointing_disable()
        model.eval()
    assert np.isfinite(result.training_loss)
    for t in ("comp", "gen"):
        assert not torch.equal(layer.plugins[t].B, before[t]), t


def test_tied_embeddings_get_the_mean_rows_once():
    torch.manual_seed(0)
    m = HealthGPT(HealthGPTConfig.preset("tiny", llm_config=dict(TINY_PHI3, tie_word_embeddings=True)))
    emb, head = m.llm.get_input_embeddings().weight, m.llm.get_output_embeddings().weight
    assert head is emb and emb.shape[0] == 40206
    torch.testing.assert_close(emb[32011:], emb[:32011].mean(0).expand(8195, -1), rtol=0, atol=1e-6)


def test_phi4_template_renders_the_release_format():
    from healthgpt.model.templates import TEMPLATES

    text, spans = TEMPLATES["phi4"].render([("user", "Q"), ("assistant", "A")], system="S", generation_prefix=None)
    assert text == "<|im_start|>system<|im_sep|>\nS<|im_end|>\n<|im_start|>user<|im_sep|>\nQ<|im_end|>\n<|im_start|>assistant<|im_sep|>\nA<|im_end|>"
    assert [text[a:b] for a, b in spans] == ["A<|im_end|>"]
    prompt, _ = TEMPLATES["phi3"].render([("user", "Q")], generation_prefix="<start_index>")
    assert prompt == "<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\nQ<|end|>\n<|assistant|>\n<start_index>"
