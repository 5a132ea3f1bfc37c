"""Patching real transformers classes (tiny random configs): targets, training, identity at B = 0."""

import pytest
import torch

import hlora
from hlora.layer import AdapterLayer

PLUGINS = {"comp": hlora.PluginConfig(rank=8, num_experts=4, alpha=16), "gen": hlora.PluginConfig(rank=12, num_experts=3, alpha=8)}

EXPECTED_TARGETS = {  # module-name suffixes "all-linear" must adapt (per layer)
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gpt2": {"c_attn", "c_proj", "c_fc"},
    "clip_vision": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"},
}


def randomize_plugins(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in hlora.adapter_layers(model):
            for p in layer.plugins.values():
                p.B.copy_(torch.randn(p.B.shape, generator=g) * 0.1)


@pytest.mark.parametrize("name", list(EXPECTED_TARGETS))
def test_all_linear_patch_trains_only_plugins_and_is_identity_at_b_zero(name, tiny_model, inputs_for, output_of):
    model = tiny_model(name)
    inputs = inputs_for(name)
    with torch.no_grad():
        base = output_of(model, inputs)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    assert hlora.inject(model, hlora.HLoRAConfig(plugins=PLUGINS, target_modules="all-linear")) is model
    layers = dict((n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer))
    assert {n.rpartition(".")[2] for n in layers} == EXPECTED_TARGETS[name]
    assert not any("lm_head" in n for n in layers)
    assert all(k in model.state_dict() and torch.equal(model.state_dict()[k], v) for k, v in before.items())

    for task in ("comp", "gen", None, ["gen", None, "comp"]):
        hlora.set_task(model, task)
        with torch.no_grad():
            assert torch.equal(output_of(model, inputs), base), f"fresh plugins changed the output ({task})"

    randomize_plugins(model)
    hlora.set_task(model, "gen")
    model.train()
    out = output_of(model, inputs)
    assert not torch.allclose(out, base)
    out.float().pow(2).mean().backward()
    for pname, p in model.named_parameters():
        is_plugin = ".plugins." in pname
        assert p.requires_grad == is_plugin, pname
        if ".plugins.gen." in pname:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname
        else:
            assert p.grad is None, f"{pname} got a gradient but is not the routed plugin"


def test_target_selection_forms(tiny_model):
    def targets(**kw):
        model = tiny_model("llama")
        hlora.inject(model, hlora.HLoRAConfig(plugins={"t": PLUGINS["comp"]}, **kw))
        return sorted(n for n, m in model.named_modules() if isinstance(m, AdapterLayer))

    assert targets(target_modules=["q_proj", "v_proj"]) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert targets(target_modules=r".*\.mlp\.(up|down)_proj") == [f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("down_proj", "up_proj")]
    assert targets(target_modules="all-linear", layers_to_transform=[1], exclude_modules=["mlp.gate_proj", "mlp.up_proj"]) == sorted(
        f"model.layers.1.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj")
    )
    with pytest.raises(ValueError, match=r"matched no module of LlamaForCausalLM.*model.layers.0.self_attn.q_proj"):
        targets(target_modules=["query_key_value"])
    with pytest.raises(TypeError, match="only nn.Linear"):
        targets(target_modules=["input_layernorm"])


def test_modules_to_save_train_and_inject_twice_is_an_error(tiny_model):
    model = tiny_model("llama")
    hlora.inject(model, hlora.HLoRAConfig(plugins=PLUGINS, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    trainable = hlora.trainable_parameters(model)
    assert "lm_head.weight" in trainable and all(".plugins." in n or n == "lm_head.weight" for n in trainable)
    hlora.set_trainable(model, plugins=["gen"], modules_to_save=False)
    assert all(".plugins.gen." in n for n in hlora.trainable_parameters(model))
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        hlora.set_trainable(model, plugins=["nope"])
    with pytest.raises(RuntimeError, match="already has hlora plugins"):
        hlora.inject(model, hlora.HLoRAConfig(plugins=PLUGINS))
    with pytest.raises(ValueError, match=r"modules_to_save \['classifier'\]"):
        hlora.inject(tiny_model("llama"), hlora.HLoRAConfig(plugins=PLUGINS, modules_to_save=["classifier"]))


def test_unload_restores_the_original_modules(tiny_model, inputs_for, output_of):
    model = tiny_model("gpt2")
    inputs = inputs_for("gpt2")
    with torch.no_grad():
        base = output_of(model, inputs)
    hlora.inject(model, hlora.HLoRAConfig(plugins=PLUGINS))
    randomize_plugins(model)
    hlora.unload(model)
    assert not hlora.adapter_layers(model) and hlora.get_config(model) is None
    with torch.no_grad():
        assert torch.equal(output_of(model, inputs), base)


def test_merge_is_exact_for_one_expert_and_refused_otherwise(tiny_model, inputs_for, output_of):
    for name in ("llama", "gpt2"):
        model = tiny_model(name)
        inputs = inputs_for(name)
        W = {n: p.detach().clone() for n, p in model.named_parameters()}
        hlora.inject(model, hlora.HLoRAConfig(plugins={"one": hlora.PluginConfig(4, 1, 8), "moe": PLUGINS["comp"]}))
        randomize_plugins(model)
        hlora.set_task(model, "one")
        with torch.no_grad():
            adapted = output_of(model, inputs)
            hlora.merge(model, "one")
            torch.testing.assert_close(output_of(model, inputs), adapted, rtol=1e-5, atol=1e-5)
            hlora.set_task(model, "moe")
            with pytest.raises(RuntimeError, match="merged into the base weight"):
                output_of(model, inputs)
            hlora.unmerge(model)
        for n, p in model.named_parameters():
            if n in W:
                torch.testing.assert_close(p, W[n], rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="exact only for k = 1"):
            hlora.merge(model, "moe")
