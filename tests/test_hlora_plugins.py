"""Plugins as artefacts: add and delete plugins on an injected model, load any subset of a
checkpoint's plugins under new names into a model that holds others (tiny random Llama)."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import hlora
from hlora.io import WEIGHTS_NAME

pytestmark = pytest.mark.usefixtures("one_thread")

PLUGINS = {"comp": hlora.PluginConfig(8, 2, 16), "gen": hlora.PluginConfig(4, 1, 6)}
TASKS = ["comp", "gen", None, ["comp", "gen", None], ["gen", "gen", "comp"], ["comp", None, "comp"]]


def _injected(tiny_model, targets=("v_proj", "o_proj"), seed=0):
    model = tiny_model("llama")
    hlora.inject(model, hlora.HLoRAConfig(plugins=PLUGINS, target_modules=list(targets)))
    _randomise_plugins(model, seed)
    return model


def _randomise_plugins(model, seed, only=None):
    """B is zero at init (a no-op plugin): give every plugin tensor fresh random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".plugins." in name and (only is None or f".plugins.{only}." in name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@torch.no_grad()
def _outputs(model, x, tasks=TASKS):
    out = {}
    for t in tasks:
        hlora.set_task(model, t)
        out[repr(t)] = model(input_ids=x).logits.clone()
    return out


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            hlora.get_config(model).to_dict(),
            [(n, type(m).__name__) for n, m in model.named_modules()],
            hlora.get_task(model))


def _assert_same(model, snap):
    state, grads, config, modules, task = snap
    now = model.state_dict()
    assert list(now) == list(state) and all(torch.equal(now[k], state[k]) for k in state)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert hlora.get_config(model).to_dict() == config
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == modules
    assert hlora.get_task(model) == task


def _x():
    return torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(3))


def test_adding_then_deleting_plugins_never_changes_what_the_others_compute(tiny_model, tmp_path):
    model, x = _injected(tiny_model), _x()
    before = _outputs(model, x)

    hlora.add_plugin(model, "seg", hlora.PluginConfig(6, 3, 12))
    _randomise_plugins(model, 7, only="seg")  # a non-zero new plugin: any leak into the others would show
    assert hlora.get_config(model).plugin_names == ["comp", "gen", "seg"]
    assert hlora.get_config(model).plugin_targets is None  # same layers as the others
    after = _outputs(model, x)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the new plugin computes something and trains alone
    seg = _outputs(model, x, ["seg", ["seg", "comp", None]])
    assert not torch.equal(seg["'seg'"], before["None"])
    trainable = set(hlora.trainable_parameters(model))
    assert trainable and all(".plugins.seg." in n for n in trainable)
    assert len(trainable) == 3 * 4  # A, B, router in 4 layers

    hlora.delete_plugin(model, "gen")
    assert hlora.get_config(model).plugin_names == ["comp", "seg"]
    kept = _outputs(model, x, ["comp", None, ["comp", None, "comp"]])
    assert all(torch.equal(kept[k], before[k]) for k in kept)
    assert all(torch.equal(v, seg[k]) for k, v in _outputs(model, x, ["seg", ["seg", "comp", None]]).items())
    assert not any(".plugins.gen." in k for k in model.state_dict())

    # the stored config is in sync: a fresh model loaded from the save computes the same for every task
    hlora.save(model, tmp_path / "ckpt")
    fresh = hlora.load(tiny_model("llama"), tmp_path / "ckpt")
    tasks = ["comp", "seg", None, ["seg", "comp", None]]
    assert all(torch.equal(v, _outputs(model, x, tasks)[k]) for k, v in _outputs(fresh, x, tasks).items())


def test_a_plugin_with_its_own_targets_adapts_only_those(tiny_model, tmp_path):
    model, x = _injected(tiny_model), _x()
    base = {n: type(m).__name__ for n, m in model.named_modules()}
    before = _outputs(model, x)
    hlora.add_plugin(model, "gen2", hlora.PluginConfig(4, 2, 8), target_modules=["q_proj", "o_proj"])
    _randomise_plugins(model, 9, only="gen2")
    config = hlora.get_config(model)
    assert config.plugin_targets == {"gen2": [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("o_proj", "q_proj")]}
    layers = dict(hlora.named_adapter_layers(model))
    assert sorted(layers["model.layers.0.self_attn.q_proj"].plugins) == ["gen2"]  # adapted for it alone
    assert sorted(layers["model.layers.1.self_attn.v_proj"].plugins) == ["comp", "gen"]
    assert sorted(layers["model.layers.1.self_attn.o_proj"].plugins) == ["comp", "gen", "gen2"]
    assert not any(layer.training for layer in layers.values())  # new layers follow the eval model (no dropout)
    after = _outputs(model, x)
    assert all(torch.equal(before[k], after[k]) for k in before)

    # a mixed batch gives each sample what it gets alone (layers without a sample's plugin: base only)
    tasks = ["gen2", "comp", "gen2"]
    mixed = _outputs(model, x, [tasks])[repr(tasks)]
    for i, t in enumerate(tasks):
        hlora.set_task(model, t)
        with torch.no_grad():
            alone = model(input_ids=x[i : i + 1]).logits[0]
        torch.testing.assert_close(mixed[i], alone, rtol=1e-5, atol=1e-5)

    # the layout survives save and load into a fresh model
    hlora.save(model, tmp_path / "ckpt")
    fresh = hlora.load(tiny_model("llama"), tmp_path / "ckpt")
    assert hlora.get_config(fresh).to_dict() == config.to_dict()
    assert {n: sorted(layer.plugins) for n, layer in hlora.named_adapter_layers(fresh)} == \
           {n: sorted(layer.plugins) for n, layer in hlora.named_adapter_layers(model)}
    tasks_all = ["gen2", ["gen2", "comp", None]]
    assert all(torch.equal(v, _outputs(model, x, tasks_all)[k]) for k, v in _outputs(fresh, x, tasks_all).items())

    # deleting it puts the base modules back where it alone was
    hlora.delete_plugin(model, "gen2")
    assert {n: type(m).__name__ for n, m in model.named_modules()} == base
    assert hlora.get_config(model).plugin_targets is None
    assert all(torch.equal(v, before[k]) for k, v in _outputs(model, x).items())


def test_freeze_existing_false_keeps_the_other_flags(tiny_model):
    model = _injected(tiny_model)
    hlora.set_trainable(model, ["gen"])
    hlora.add_plugin(model, "extra", hlora.PluginConfig(2, 1, 2), freeze_existing=False)
    trainable = set(hlora.trainable_parameters(model))
    assert {n.split(".plugins.")[1].split(".")[0] for n in trainable} == {"gen", "extra"}


def test_plugin_changes_refused_with_clear_errors(tiny_model):
    model = _injected(tiny_model)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="plugin 'gen' already exists"):
        hlora.add_plugin(model, "gen", hlora.PluginConfig(2, 1, 2))
    with pytest.raises(ValueError, match="divisible"):
        hlora.add_plugin(model, "bad", hlora.PluginConfig(3, 1, 2).__dict__ | {"num_experts": 2})
    with pytest.raises(ValueError, match="Python identifier"):
        hlora.add_plugin(model, "not a name", hlora.PluginConfig(2, 1, 2))
    with pytest.raises(ValueError, match="matched no linear module"):
        hlora.add_plugin(model, "new", hlora.PluginConfig(2, 1, 2), target_modules=["no_such_proj"])
    with pytest.raises(ValueError, match=r"unknown task 'seg'; this model's plugins are \['comp', 'gen'\]"):
        hlora.set_task(model, ["comp", "seg"])
    with pytest.raises(ValueError, match=r"unknown task 'seg'; this model's plugins are \['comp', 'gen'\]"):
        hlora.delete_plugin(model, "seg")
    _assert_same(model, snap)
    hlora.merge(model, "gen")
    with pytest.raises(RuntimeError, match="while plugin 'gen' is merged"):
        hlora.add_plugin(model, "new", hlora.PluginConfig(2, 1, 2))
    with pytest.raises(RuntimeError, match="while plugin 'gen' is merged"):
        hlora.delete_plugin(model, "comp")
    hlora.unmerge(model)
    hlora.delete_plugin(model, "comp")
    with pytest.raises(ValueError, match="only plugin; use hlora.unload"):
        hlora.delete_plugin(model, "gen")


def test_load_a_subset_of_plugins_under_new_names_next_to_others(tiny_model, tmp_path):
    x = _x()
    donor = _injected(tiny_model, seed=1)
    hlora.save(donor, tmp_path / "run_a")
    want = _outputs(donor, x, ["comp", "gen"])

    model = tiny_model("llama")
    hlora.inject(model, hlora.HLoRAConfig(plugins={"comp": hlora.PluginConfig(8, 2, 16)}, target_modules=["v_proj", "o_proj"]))
    _randomise_plugins(model, 2)
    hlora.set_trainable(model)
    mine = _outputs(model, x, ["comp", None])
    hlora.load(model, tmp_path / "run_a", plugins=["gen", "comp"], rename={"comp": "comp_a"})
    assert hlora.get_config(model).plugin_names == ["comp", "comp_a", "gen"]
    got = _outputs(model, x, ["comp", None, "comp_a", "gen"])
    assert all(torch.equal(got[k], mine[k]) for k in mine)  # the model's own plugin untouched
    assert torch.equal(got["'comp_a'"], want["'comp'"]) and torch.equal(got["'gen'"], want["'gen'"])
    trainable = {n.split(".plugins.")[1].split(".")[0] for n in hlora.trainable_parameters(model)}
    assert trainable == {"comp"}  # loaded plugins come in frozen, the model's flags stay

    # one plugin under a new name into a model without plugins
    fresh = hlora.load(tiny_model("llama"), tmp_path / "run_a", plugins=["gen"], rename={"gen": "report"})
    assert hlora.get_config(fresh).plugin_names == ["report"]
    assert torch.equal(_outputs(fresh, x, ["report"])["'report'"], want["'gen'"])

    with pytest.raises(hlora.CheckpointError, match=r"unknown plugin\(s\) \['seg'\]; available: \['comp', 'gen'\]"):
        hlora.load(fresh, tmp_path / "run_a", plugins=["seg"])
    with pytest.raises(hlora.CheckpointError, match="not being loaded"):
        hlora.load(fresh, tmp_path / "run_a", plugins=["gen"], rename={"comp": "x"})
    with pytest.raises(hlora.CheckpointError, match="the same name"):
        hlora.load(fresh, tmp_path / "run_a", rename={"comp": "gen"})


def test_a_load_failing_midway_leaves_the_model_bit_identical(tiny_model, tmp_path):
    donor = _injected(tiny_model, seed=1)
    hlora.save(donor, tmp_path / "ckpt")
    # damage the last layer's 'gen' plugin: the new plugin is added before the check fails
    weights = tmp_path / "ckpt" / WEIGHTS_NAME
    tensors = load_file(weights)
    key = "model.layers.1.self_attn.o_proj.plugins.gen.B"
    tensors[key] = torch.randn(tensors[key].shape[0], tensors[key].shape[1] + 1)
    save_file(tensors, weights, metadata={"hlora_config": hlora.get_config(donor).to_json(), "format": "pt"})

    model = tiny_model("llama")
    hlora.inject(model, hlora.HLoRAConfig(plugins={"own": hlora.PluginConfig(4, 2, 4)}, target_modules=["q_proj"]))
    _randomise_plugins(model, 4)
    hlora.set_trainable(model, [])
    hlora.set_task(model, ["own", None, "own"])
    snap = _snapshot(model)
    x = _x()
    out = _outputs(model, x, [["own", None, "own"]])
    with pytest.raises(hlora.CheckpointError, match=rf"shape mismatch \(1\): {key}"):
        hlora.load(model, tmp_path / "ckpt", rename={"comp": "comp2"})
    _assert_same(model, snap)
    assert torch.equal(_outputs(model, x, [["own", None, "own"]])[repr(["own", None, "own"])], out[repr(["own", None, "own"])])
    # a plugin the model holds with another config: refused before anything is added
    with pytest.raises(hlora.CheckpointError, match="plugin 'own': checkpoint config"):
        hlora.load(model, tmp_path / "ckpt", plugins=["comp"], rename={"comp": "own"})
    _assert_same(model, snap)
