"""Per-sample task routing: equals running each sample alone, survives gradient checkpointing."""

import pytest
import torch

import hlora

PLUGINS = {"comp": hlora.PluginConfig(rank=8, num_experts=4, alpha=16), "gen": hlora.PluginConfig(rank=12, num_experts=3, alpha=8)}


def patched(tiny_model, name="llama", variant="hlora", dropout=0.0):
    model = tiny_model(name)
    plugins = {n: hlora.PluginConfig(p.rank, p.num_experts, p.alpha, dropout=dropout) for n, p in PLUGINS.items()}
    hlora.inject(model, hlora.HLoRAConfig(plugins=plugins, variant=variant))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in hlora.adapter_layers(model):
            for p in layer.plugins.values():
                for name, t in p.named_parameters():
                    if name.endswith("B"):
                        t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return model


def plugin_grads(model):
    return {n: p.grad.clone() if p.grad is not None else None for n, p in model.named_parameters() if ".plugins." in n}


@pytest.mark.parametrize("variant", ["hlora", "moelora", "lora"])
def test_mixed_batch_equals_each_sample_alone_with_its_task(tiny_model, inputs_for, variant):
    model = patched(tiny_model, variant=variant)
    ids = inputs_for("llama", batch=4, seq=7)["input_ids"]
    tasks = ["gen", "comp", None, "gen"]

    hlora.set_task(model, tasks)
    logits = model(input_ids=ids).logits
    logits.pow(2).mean().backward()
    mixed_grads = plugin_grads(model)
    model.zero_grad(set_to_none=True)

    alone = []
    for i, t in enumerate(tasks):
        with hlora.task(model, t):
            out = model(input_ids=ids[i : i + 1]).logits
            if out.requires_grad:  # a sample routed to no plugin has nothing to train
                (out.pow(2).sum() / logits.numel()).backward()
            alone.append(out.detach())
    torch.testing.assert_close(logits.detach(), torch.cat(alone), rtol=1e-5, atol=1e-5)
    for n, g in plugin_grads(model).items():
        if g is None:
            assert mixed_grads[n] is None, n
        else:
            torch.testing.assert_close(mixed_grads[n], g, rtol=1e-4, atol=1e-6)
    assert hlora.get_task(model) == tasks, "the task context did not restore the routing"


def test_int_tensor_routing_equals_name_routing(tiny_model, inputs_for):
    model = patched(tiny_model)
    ids = inputs_for("llama", batch=3)["input_ids"]
    with torch.no_grad():
        hlora.set_task(model, ["gen", None, "comp"])
        by_name = model(input_ids=ids).logits
        hlora.set_task(model, torch.tensor([1, -1, 0], dtype=torch.int32))
        assert torch.equal(model(input_ids=ids).logits, by_name)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_recompute_keeps_per_sample_routing(tiny_model, inputs_for, use_reentrant):
    ids = inputs_for("llama", batch=3, seq=5)["input_ids"]
    results = []
    for checkpointing in (False, True):
        model = patched(tiny_model, dropout=0.1)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        calls = []
        hlora.adapter_layers(model)[0].register_forward_hook(lambda *a: calls.append(1))
        hlora.set_task(model, ["comp", "gen", None])
        torch.manual_seed(11)
        loss = model(input_ids=ids, labels=ids).loss
        hlora.set_task(model, ["comp", "gen", None])  # re-setting the same routing must not matter
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1), "the checkpointed forward was not recomputed"
        results.append((loss.detach(), plugin_grads(model)))
    (loss0, g0), (loss1, g1) = results
    torch.testing.assert_close(loss0, loss1)
    assert any(g is not None and g.abs().sum() > 0 for g in g0.values())
    for n in g0:
        assert (g0[n] is None) == (g1[n] is None), n
        if g0[n] is not None:
            torch.testing.assert_close(g0[n], g1[n], rtol=1e-4, atol=1e-6)


def test_routing_errors_are_clear(tiny_model, inputs_for):
    model = patched(tiny_model)
    with pytest.raises(ValueError, match=r"unknown task 'vqa'; this model's plugins are \['comp', 'gen'\]"):
        hlora.set_task(model, "vqa")
    with pytest.raises(ValueError, match=r"unknown task 'x'"):
        hlora.set_task(model, ["comp", "x"])
    with pytest.raises(ValueError, match=r"outside \[-1, 2\)"):
        hlora.set_task(model, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="integer tensor"):
        hlora.set_task(model, torch.tensor([0.0, 1.0]))
    for tasks in (["comp", "gen"], ["gen", "gen"]):
        hlora.set_task(model, tasks)
        with pytest.raises(ValueError, match="routing holds 2 tasks but the layer got input of shape"):
            model(input_ids=inputs_for("llama", batch=3)["input_ids"])
    hlora.set_task(model, ["comp", "gen"])
    with pytest.raises(RuntimeError, match="no hlora plugins"):
        hlora.set_task(tiny_model("llama"), "comp")
    with pytest.raises(ValueError, match="unknown task"):
        with hlora.task(model, "nope"):
            pass
    assert hlora.get_task(model) == ["comp", "gen"]


def test_token_groups_sort_tokens_by_plugin_once_per_shape():
    """The routing's grouping of tokens by plugin (the grouped kernels' segments): a stable sort
    with the unrouted tokens last, host counts, built once per token shape and shared by layers;
    ``keep`` restricts it to the plugins a layer holds."""
    routing = hlora.routing.Routing((4, 7, 9), torch.tensor([1, -1, 0, 1, 2]))
    x = torch.randn(5, 3, 8)  # 5 samples of 3 tokens
    groups = routing.token_groups(x)
    per_token = torch.tensor([1, -1, 0, 1, 2]).repeat_interleave(3)
    order, counts = groups
    assert counts == (3, 6, 3) and order.dtype == torch.int32
    assert order.tolist() == [6, 7, 8, 0, 1, 2, 9, 10, 11, 12, 13, 14, 3, 4, 5]
    key = torch.where(per_token < 0, 3, per_token)
    assert torch.equal(key[order.long()], key.sort().values)
    assert routing.token_groups(torch.randn(5, 3, 8)) is groups  # cached per (device, token shape)
    assert routing.token_groups(torch.randn(5, 2, 8)).counts == (2, 4, 2)
    # a layer holding plugins 9 and 4 (positions 2 and 0 of active, in that order): plugin 7 is unrouted
    held = routing.token_groups(x, keep=(2, 0))
    assert held.counts == (3, 3)
    assert held.order.tolist() == [12, 13, 14, 6, 7, 8, 0, 1, 2, 3, 4, 5, 9, 10, 11]
    assert hlora.routing.Routing((4,), batch=5).token_groups(x) is None
    with pytest.raises(ValueError, match="batch dimension first"):
        routing.token_groups(torch.randn(4, 3, 8))
    with pytest.raises(ValueError, match=r"\[-1, 2\)"):
        hlora.routing.TokenGroups.from_token_plugin(torch.tensor([0, 2]), 2)
