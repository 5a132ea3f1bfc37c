"""A k = 1 plugin exported as a PEFT LoRA adapter directory loads in the real peft library
(``PeftModel.from_pretrained``) and back through ``hlora.from_peft`` with the same outputs."""

import json

import pytest
import torch
from safetensors.torch import load_file

import hlora

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # plugin tensors (B starts at zero) and modules_to_save
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


CASES = {  # model, variant, targets, modules_to_save, rsLoRA
    "llama": ("llama", "hlora", ["q_proj", "v_proj", "down_proj"], ["lm_head"], False),
    "llama-rslora": ("llama", "hlora", ["q_proj", "v_proj", "down_proj"], None, True),
    "gpt2": ("gpt2", "hlora", ["c_attn", "c_fc"], None, False),
    "llama-moelora": ("llama", "moelora", ["o_proj"], None, True),
    "llama-lora": ("llama", "lora", ["k_proj", "up_proj"], None, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_plugin_loads_in_peft_and_back_with_the_same_outputs(tmp_path, tiny_model, inputs_for, case):
    from peft import PeftModel

    name, variant, targets, save_modules, rslora = CASES[case]
    experts = 2 if variant == "lora" else 1  # the lora baseline has no router: any k exports
    model = tiny_model(name)
    hlora.inject(model, hlora.HLoRAConfig(
        plugins={"wide": hlora.PluginConfig(8, 4, 16), "task": hlora.PluginConfig(6, experts, 9, dropout=0.1)},
        target_modules=targets, modules_to_save=save_modules, variant=variant))
    _randomise(model, 1)
    hlora.set_task(model, "task")
    ids = inputs_for(name)["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        base = tiny_model(name)(input_ids=ids).logits
    assert not torch.allclose(ours, base)

    out = tmp_path / "adapter"
    hlora.to_peft(model, "task", out, use_rslora=rslora)
    cfg = json.loads((out / "adapter_config.json").read_text())
    r, scale = 6, 9 / (6 / experts)
    assert (cfg["r"], cfg["use_rslora"], cfg["target_modules"], cfg["lora_dropout"]) == (r, rslora, sorted(targets), 0.1)
    assert cfg["lora_alpha"] == pytest.approx(scale * (r ** 0.5 if rslora else r))
    assert cfg["modules_to_save"] == save_modules
    keys = set(load_file(out / "adapter_model.safetensors"))
    layers = [p for p, layer in hlora.named_adapter_layers(model)]
    assert {k for k in keys if ".lora_" in k} == {f"base_model.model.{p}.lora_{ab}.weight" for p in layers for ab in "AB"}

    peft_model = PeftModel.from_pretrained(tiny_model(name), out).eval()
    assert peft_model.peft_config["default"].r == r
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    back = hlora.from_peft(tiny_model(name), out, plugin="task")
    with torch.no_grad():
        again = back(input_ids=ids).logits
    torch.testing.assert_close(again, ours, rtol=1e-5, atol=1e-5)


def test_plugins_added_with_their_own_targets_export_full_paths(tmp_path, tiny_model, inputs_for):
    from peft import PeftModel

    model = tiny_model("llama")
    hlora.inject(model, hlora.HLoRAConfig(plugins={"comp": hlora.PluginConfig(4, 1, 8)}, target_modules=["v_proj"]))
    hlora.add_plugin(model, "late", hlora.PluginConfig(4, 1, 4), target_modules=r"model\.layers\.1\.self_attn\.(q|v)_proj")
    _randomise(model, 2)
    hlora.set_task(model, "late")
    ids = inputs_for("llama")["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    hlora.to_peft(model, "late", tmp_path)
    # layer 0 also has q_proj/v_proj: leaf names would pick them too, so the paths are written out
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_export_refuses_what_peft_cannot_represent(tmp_path, tiny_model):
    model = tiny_model("llama")
    hlora.inject(model, hlora.HLoRAConfig(plugins={"mix": hlora.PluginConfig(8, 2, 16)}, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="plugin 'mix' has 2 experts"):
        hlora.to_peft(model, "mix", tmp_path / "a")
    with pytest.raises(ValueError, match=r"unknown plugin 'gen'; this model's plugins are \['mix'\]"):
        hlora.to_peft(model, "gen", tmp_path / "b")
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()
