"""save / load round trips, all-or-nothing failed loads, crash-safe saves, PEFT adapter import."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import hlora
from hlora.files import atomic_write
from hlora.io import WEIGHTS_NAME

PLUGINS = {"comp": hlora.PluginConfig(rank=8, num_experts=4, alpha=16), "gen": hlora.PluginConfig(rank=12, num_experts=3, alpha=8)}


def trained(model, seed=7, **config):
    hlora.inject(model, hlora.HLoRAConfig(plugins=PLUGINS, **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hlora.trainable_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        [type(m).__name__ for m in model.modules()],
    )


def assert_unchanged(model, snap):
    state, grads, types = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert [type(m).__name__ for m in model.modules()] == types


def test_save_then_load_in_a_fresh_process_is_bit_identical(tmp_path, tiny_model, inputs_for):
    model = trained(tiny_model("phi3"), modules_to_save=["lm_head"])
    ids = inputs_for("phi3")["input_ids"]
    hlora.set_task(model, ["gen", "comp", None])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    hlora.save(model, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "hlora_config.json").read_text())["plugins"]["gen"]["rank"] == 12
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import sys, torch, hlora
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from conftest import TINY_MODELS
        base = torch.load({str(tmp_path / "ids.pt")!r})
        torch.manual_seed(0)  # the fixture's base weights; the plugins must come from the file
        model = TINY_MODELS["phi3"]().eval()
        hlora.load(model, {str(tmp_path / "ckpt")!r})
        hlora.set_task(model, ["gen", "comp", None])
        with torch.no_grad():
            torch.save(model(input_ids=base).logits, {str(tmp_path / "out.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "HLORA_BACKEND": "torch"})
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_save_a_subset_of_plugins_and_load_into_an_injected_model(tmp_path, tiny_model, inputs_for):
    model = trained(tiny_model("llama"))
    hlora.save(model, tmp_path / "gen", plugins=["gen"])
    assert all(".plugins.gen." in k for k in load_file(tmp_path / "gen" / WEIGHTS_NAME))
    fresh = tiny_model("llama")
    hlora.inject(fresh, hlora.HLoRAConfig(plugins=PLUGINS))
    hlora.load(fresh, tmp_path / "gen")
    ids = inputs_for("llama")["input_ids"]
    with torch.no_grad(), hlora.task(model, "gen"), hlora.task(fresh, "gen"):
        assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
    with pytest.raises(hlora.CheckpointError, match=r"unknown plugin\(s\) \['comp'\]"):
        hlora.load(tiny_model("llama"), tmp_path / "gen", plugins=["comp"])


def _tamper(path, fn):
    f = path / WEIGHTS_NAME
    from safetensors import safe_open

    with safe_open(f, framework="pt") as h:
        meta = h.metadata()
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata=meta)


@pytest.mark.parametrize("injected", [False, True])
@pytest.mark.parametrize("damage,message", [
    (lambda t: t.pop("model.layers.1.mlp.down_proj.plugins.comp.router"), r"missing keys \(1\): model.layers.1.mlp.down_proj.plugins.comp.router"),
    (lambda t: t.update({"model.layers.0.mlp.extra.plugins.comp.A": torch.ones(1)}), r"unexpected keys \(1\): model.layers.0.mlp.extra"),
    (lambda t: t.update({"model.layers.0.self_attn.o_proj.plugins.gen.B": torch.ones(32, 5)}), r"shape mismatch \(1\): model.layers.0.self_attn.o_proj.plugins.gen.B: file \(32, 5\) vs model \(32, 12\)"),
    (lambda t: t.update({"model.layers.1.self_attn.q_proj.plugins.gen.router": torch.ones(3, 32, dtype=torch.int64)}),
     r"dtype mismatch \(1\): model.layers.1.self_attn.q_proj.plugins.gen.router: file torch.int64 vs model torch.float32"),
])
def test_a_failed_load_names_the_keys_and_leaves_the_model_as_it_was(tmp_path, tiny_model, injected, damage, message):
    hlora.save(trained(tiny_model("llama")), tmp_path)
    _tamper(tmp_path, damage)
    model = tiny_model("llama")
    if injected:
        trained(model, seed=99)
    snap = snapshot(model)
    with pytest.raises(hlora.CheckpointError, match=message):
        hlora.load(model, tmp_path)
    assert_unchanged(model, snap)
    assert (hlora.get_config(model) is not None) == injected


def test_non_strict_load_tolerates_missing_keys_but_not_shapes(tmp_path, tiny_model):
    source = trained(tiny_model("llama"))
    hlora.save(source, tmp_path)
    _tamper(tmp_path, lambda t: t.pop("model.layers.0.self_attn.q_proj.plugins.gen.A"))
    model = tiny_model("llama")
    hlora.load(model, tmp_path, strict=False)
    got, want = model.get_submodule("model.layers.1.self_attn.q_proj.plugins.gen"), source.get_submodule("model.layers.1.self_attn.q_proj.plugins.gen")
    assert torch.equal(got.A, want.A)
    _tamper(tmp_path, lambda t: t.update({"model.layers.0.self_attn.o_proj.plugins.gen.B": torch.ones(2, 2)}))
    with pytest.raises(hlora.CheckpointError, match="shape mismatch"):
        hlora.load(tiny_model("llama"), tmp_path, strict=False)


def test_loading_into_a_model_with_a_different_config_is_refused(tmp_path, tiny_model):
    hlora.save(trained(tiny_model("llama")), tmp_path)
    model = tiny_model("llama")
    hlora.inject(model, hlora.HLoRAConfig(plugins={"comp": hlora.PluginConfig(16, 4, 16), "gen": PLUGINS["gen"]}))
    snap = snapshot(model)
    with pytest.raises(hlora.CheckpointError, match="plugin 'comp': checkpoint config"):
        hlora.load(model, tmp_path)
    assert_unchanged(model, snap)
    with pytest.raises(FileNotFoundError, match="not an hlora checkpoint directory"):
        hlora.load(model, tmp_path / "missing")


def test_a_crash_mid_save_leaves_the_previous_checkpoint_whole(tmp_path, tiny_model, monkeypatch, inputs_for):
    model = trained(tiny_model("llama"))
    hlora.save(model, tmp_path)
    before = load_file(tmp_path / WEIGHTS_NAME)
    with torch.no_grad():
        for p in hlora.trainable_parameters(model).values():
            p.add_(1.0)

    def dies_halfway(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\x00" * 100)
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(hlora.io, "save_file", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        hlora.save(model, tmp_path)
    after = load_file(tmp_path / WEIGHTS_NAME)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert sorted(os.listdir(tmp_path)) == ["hlora_config.json", WEIGHTS_NAME], "temporary files were left behind"
    hlora.load(tiny_model("llama"), tmp_path)


@pytest.mark.parametrize("name,targets", [("llama", ["q_proj", "v_proj", "down_proj"]), ("gpt2", ["c_attn", "c_fc"])])
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_lora_adapter_imports_as_a_one_expert_plugin(tmp_path, tiny_model, inputs_for, name, targets, rslora):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        tiny_model(name),
        LoraConfig(r=4, lora_alpha=12, target_modules=targets, init_lora_weights=False, use_rslora=rslora,
                   fan_in_fan_out=name == "gpt2", modules_to_save=["lm_head"] if name == "llama" else None),
    ).eval()
    ids = inputs_for(name)["input_ids"]
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path)
    model = tiny_model(name)
    hlora.from_peft(model, tmp_path, plugin="peft")
    assert len(hlora.adapter_layers(model)) == 2 * len(targets)
    with torch.no_grad():
        base = tiny_model(name)(input_ids=ids).logits
        got = model(input_ids=ids).logits
    assert not torch.allclose(want, base)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_peft_options_without_an_equivalent_are_refused(tmp_path, tiny_model):
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)).save_pretrained(tmp_path)
    model = tiny_model("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="use_dora=True has no H-LoRA equivalent"):
        hlora.from_peft(model, tmp_path)
    assert_unchanged(model, snap)


# ---- the checked copy every loader uses ---------------------------------------------------------------


def _plain_model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 6))


def test_copy_checked_names_every_problem_and_copies_nothing_on_error():
    model = _plain_model()
    targets = dict(model.state_dict(keep_vars=True))
    before = {k: v.detach().clone() for k, v in targets.items()}
    good = {k: torch.randn(v.shape, dtype=torch.float64) for k, v in targets.items()}  # float64 casts to float32
    broken = {**good, "1.weight": torch.randn(5, 6), "2.weight": torch.ones(1)}
    del broken["0.bias"]
    with pytest.raises(hlora.CheckpointError) as err:
        hlora.copy_checked(targets, broken, what="file.safetensors")
    text = str(err.value)
    assert text.startswith("cannot load file.safetensors: ")
    assert "missing keys (1): 0.bias" in text and "unexpected keys (1): 2.weight" in text
    assert "shape mismatch (1): 1.weight: file (5, 6) vs model (6, 5)" in text
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "a failed copy changed the model"
    with pytest.raises(hlora.CheckpointError, match="dtype mismatch \\(1\\): 0.bias: file torch.int32 vs model torch.float32"):
        hlora.copy_checked(targets, {**good, "0.bias": torch.ones(5, dtype=torch.int32)}, what="x", strict=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    partial = {k: v for k, v in good.items() if k != "0.bias"}
    hlora.copy_checked(targets, {**partial, "extra": torch.ones(2)}, what="x", strict=False)
    now = model.state_dict()
    assert torch.equal(now["0.bias"], before["0.bias"])
    assert all(torch.equal(now[k], good[k].float()) for k in partial)


def test_copy_checked_refuses_different_values_for_one_tied_tensor():
    emb = torch.nn.Embedding(7, 4)
    head = torch.nn.Linear(4, 7, bias=False)
    head.weight = emb.weight
    targets = {"embed.weight": emb.weight, "head.weight": head.weight}
    before = emb.weight.detach().clone()
    a, b = torch.randn(7, 4), torch.randn(7, 4)
    with pytest.raises(hlora.CheckpointError, match="tied in the model but different in the file \\(1\\): embed.weight = head.weight"):
        hlora.copy_checked(targets, {"embed.weight": a, "head.weight": b}, what="x")
    assert torch.equal(emb.weight, before)
    hlora.copy_checked(targets, {"embed.weight": a, "head.weight": a.clone()}, what="x")
    assert torch.equal(head.weight, a)


# ---- dropout: config and layers together ----------------------------------------------------------------


def test_set_dropout_updates_the_layers_and_the_saved_config(tmp_path):
    model = _plain_model()
    hlora.inject(model, hlora.HLoRAConfig(plugins=PLUGINS))
    with torch.no_grad():
        for p in hlora.trainable_parameters(model).values():
            p.normal_(0, 0.3)  # B != 0, or dropout on the update would be invisible
    x = torch.randn(64, 6)

    def train_equals_eval(task):
        with hlora.task(model, task):
            model.eval()
            with torch.no_grad():
                want = model(x)
            model.train()
            torch.manual_seed(0)
            with torch.no_grad():
                got = model(x)
        return torch.equal(got, want)

    assert train_equals_eval("gen")
    hlora.set_dropout(model, {"gen": 0.5})
    assert not train_equals_eval("gen") and train_equals_eval("comp")
    assert [l.plugins["gen"].dropout for l in hlora.adapter_layers(model)] == [0.5, 0.5]
    assert hlora.get_config(model).plugins["gen"].dropout == 0.5 and hlora.get_config(model).plugins["comp"].dropout == 0.0

    hlora.save(model, tmp_path)
    assert json.loads((tmp_path / "hlora_config.json").read_text())["plugins"]["gen"]["dropout"] == 0.5
    fresh = hlora.load(_plain_model(), tmp_path)
    assert hlora.get_config(fresh).plugins["gen"].dropout == 0.5
    assert [l.plugins["gen"].dropout for l in hlora.adapter_layers(fresh)] == [0.5, 0.5]

    for bad, message in (({"gen": 0.1, "nope": 0.1}, "unknown plugin 'nope'"), ({"comp": 0.2, "gen": 1.0}, r"dropout must be in \[0, 1\)")):
        with pytest.raises(ValueError, match=message):
            hlora.set_dropout(model, bad)
        assert hlora.get_config(model).plugins["gen"].dropout == 0.5 and hlora.get_config(model).plugins["comp"].dropout == 0.0
        assert {l.plugins["comp"].dropout for l in hlora.adapter_layers(model)} == {0.0}


def test_named_adapter_layers_lists_every_adapted_path():
    model = _plain_model()
    hlora.inject(model, hlora.HLoRAConfig(plugins=PLUGINS, target_modules=["1"]))
    named = list(hlora.named_adapter_layers(model))
    assert [n for n, _ in named] == ["1"] and named[0][1] is model[1] and isinstance(model[1], hlora.HLoRALinear)
    assert hlora.adapter_layers(model) == [model[1]]


def test_atomic_write_replaces_whole_files_and_cleans_up_after_a_failure(tmp_path):
    target = tmp_path / "notes.txt"
    atomic_write(target, "first")
    atomic_write(str(target), lambda tmp: open(tmp, "w").write("second"))
    assert target.read_text() == "second"

    def fails_halfway(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fails_halfway)
    assert target.read_text() == "second" and os.listdir(tmp_path) == ["notes.txt"]
