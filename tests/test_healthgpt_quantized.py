"""HealthGPT with ``load_in_4bit`` (QLoRA): the LLM's linears in bitsandbytes nf4, everything else
dense; the 4-bit model computes the dense model with the dequantized weights; training reaches only
what ``set_trainable`` names; the weight-memory function against real modules; the CLI flag."""

import argparse
import pathlib

import bitsandbytes.functional as bnbF
import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from transformers import Phi3Config, Phi3ForCausalLM

import hlora
from healthgpt import HealthGPT, HealthGPTConfig
from healthgpt.cli import add_model_arguments, model_from_args
from healthgpt.model.config import PHI3_MINI_4K, PHI4, TINY_PHI3, _plugins, llm_weight_bytes
from healthgpt.model.tokenizer import load_base_tokenizer
from hlora.quantized import QuantizedHLoRALinear, quantization_kind, quantize_4bit

pytestmark = pytest.mark.usefixtures("one_thread")

CONV = [{"from": "human", "value": "<image>\nWhat organ is shown?"}, {"from": "gpt", "value": "The liver."}]


def _build(load_in_4bit):
    torch.manual_seed(0)  # quantizing draws no random numbers: both builds get the same initial weights
    model = HealthGPT(HealthGPTConfig.preset("tiny", plugins=_plugins(8, 16, dropout=0.0), load_in_4bit=load_in_4bit))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in hlora.adapter_layers(model.llm):
            for p in layer.plugins.values():
                p.B.copy_(torch.randn(p.B.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def models():
    return _build(False), _build(True)


def _batch(model):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))
    return model.collate([model.prepare_sample(CONV, "comp", image=image), model.prepare_sample(CONV, "comp", image=image)])


def test_only_the_llm_linears_are_quantized_and_adapted(models):
    dense, q = models
    layers = dict(hlora.named_adapter_layers(q.llm))
    assert set(layers) == {n for n, _ in hlora.named_adapter_layers(dense.llm)}  # all-linear, lm_head excepted
    assert all(isinstance(m, QuantizedHLoRALinear) and m.quantization == "bnb_4bit" for m in layers.values())
    assert all(m.base_layer.weight.dtype == torch.uint8 and m.base_layer.compute_dtype == torch.float32
               for m in layers.values())
    assert type(q.llm.lm_head) is nn.Linear and q.llm.lm_head.weight.dtype == torch.float32
    dense_parts = [*q.vision.modules(), *q.projectors.modules(), q.llm.lm_head, q.llm.get_input_embeddings()]
    assert not any(quantization_kind(m) or isinstance(m, QuantizedHLoRALinear) for m in dense_parts)
    assert all(p.dtype == torch.float32 for p in [*q.vision.parameters(), *q.projectors.parameters()])


def test_4bit_model_is_the_dense_model_with_dequantized_weights(models):
    dense, q = models
    batch = _batch(q)
    with torch.no_grad():
        for (name, layer), (_, dense_layer) in zip(hlora.named_adapter_layers(q.llm), hlora.named_adapter_layers(dense.llm)):
            w = bnbF.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state)
            assert 0 < (w - dense_layer.weight).abs().max() < 0.2 * dense_layer.weight.abs().max(), name
            for t in ("comp", "gen"):
                assert torch.equal(layer.plugins[t].A, dense_layer.plugins[t].A)
        dense.eval(), q.eval()
        want_before = dense(**batch).logits
        saved = {n: l.weight.clone() for n, l in hlora.named_adapter_layers(dense.llm)}
        for layer, dense_layer in zip(hlora.adapter_layers(q.llm), hlora.adapter_layers(dense.llm)):
            dense_layer.weight.copy_(bnbF.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state))
        want = dense(**batch).logits
        for n, l in hlora.named_adapter_layers(dense.llm):
            l.weight.copy_(saved[n])
        got = q(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(want_before, want, atol=1e-4)  # nf4 changed the base: the check above could fail


def test_training_step_reaches_only_plugins_and_projector(models):
    _, q = models
    frozen = {n: t.clone() for n, t in q.llm.state_dict().items() if ".plugins." not in n}
    q.set_trainable(plugins=["comp"], projectors=["comp"], fusion=False)
    q.train()
    q.zero_grad(set_to_none=True)
    out = q(**_batch(q))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    with_grad = {n for n, p in q.named_parameters() if p.grad is not None}
    assert with_grad and all(".plugins.comp." in n or n.startswith("projectors.comp.") for n in with_grad)
    assert any(n.endswith("plugins.comp.A") for n in with_grad)
    torch.optim.SGD([p for p in q.parameters() if p.requires_grad], lr=0.1).step()
    for n, t in q.llm.state_dict().items():
        if n in frozen:
            assert torch.equal(t, frozen[n]), n  # the 4-bit base and its statistics are untouched


def test_saving_a_random_4bit_llm_is_refused(models, tmp_path):
    _, q = models
    with pytest.raises(ValueError, match="llm_path"):
        q.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_llm_weight_bytes_counts_the_real_modules():
    cfg = dict(TINY_PHI3, vocab_size=97, intermediate_size=160, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    llm = Phi3ForCausalLM(Phi3Config(**cfg))
    numel = sum(p.numel() for p in llm.parameters())
    assert llm_weight_bytes(cfg, load_in_4bit=False)["total"] == 2 * numel
    quantize_4bit(llm, torch.bfloat16, skip=["lm_head"])
    held = 0
    for m in llm.modules():
        for p in m.parameters(recurse=False):
            if quantization_kind(m) is not None and p is m.weight:
                s = p.quant_state
                held += p.numel() + s.absmax.numel() + 4 * s.state2.absmax.numel() + 4  # uint8 codes, nested fp32, offset
            else:
                held += 2 * p.numel()
    assert llm_weight_bytes(cfg, load_in_4bit=True)["total"] == held


def test_cli_flag_builds_a_4bit_model():
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    with pytest.warns(UserWarning, match="tiny preset"):
        model = model_from_args(parser.parse_args(["--load-in-4bit", "--device", "cpu"]))
    assert model.healthgpt_config.load_in_4bit
    assert all(isinstance(m, QuantizedHLoRALinear) for m in hlora.adapter_layers(model.llm))


def test_readme_states_the_computed_saving():
    readme = " ".join((pathlib.Path(__file__).parents[1] / "README.md").read_text().split())
    for name, llm, vocab in (("M3", PHI3_MINI_4K, 32011 + 8195), ("L14", PHI4, 100352 + 8195)):
        dense, nf4 = (llm_weight_bytes(llm, q, vocab)["total"] / 2**30 for q in (False, True))
        assert f"{name} {dense:.2f} GiB" in readme and f"-> {nf4:.2f} GiB ({dense - nf4:.2f} GiB saved)" in readme, name


def test_4bit_model_from_a_checkpoint_saves_and_loads_its_adapter(tmp_path):
    llm_dir = tmp_path / "phi3"
    torch.manual_seed(0)
    Phi3ForCausalLM(Phi3Config(**TINY_PHI3)).save_pretrained(llm_dir)
    load_base_tokenizer(None).save_pretrained(llm_dir)
    q = HealthGPT(HealthGPTConfig.preset("tiny", llm_path=str(llm_dir), load_in_4bit=True))
    with torch.no_grad():
        for layer in hlora.adapter_layers(q.llm):
            layer.plugins["comp"].B.normal_(0, 0.05)
    batch = _batch(q)
    q.eval()
    with torch.no_grad():
        want = q(**batch).logits
    q.save_pretrained(tmp_path / "w")
    loaded = HealthGPT.from_pretrained(tmp_path / "w").eval()
    assert loaded.healthgpt_config.load_in_4bit
    assert all(isinstance(m, QuantizedHLoRALinear) for m in hlora.adapter_layers(loaded.llm))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, want, rtol=0, atol=0)
