"""``HealthGPT.run_every_part`` (set by ``healthgpt train --deepspeed``): DeepSpeed ZeRO reduces
gradients in buckets filled in the order the backward produces them, so every process must produce
every trainable parameter's gradient, in the same order, whatever the tasks of its micro-batch.
Checked on the tiny model: the post-accumulation hook order of a one-task batch equals a mixed
batch's and a batch without images (and differs without the flag, which is what aborted ZeRO-2),
the idle task's plugin and projector get zero gradients (not None), and the loss and the used
parameters' gradients are the run without the flag's. The 2-process ZeRO-2 run itself is not in CI
(deepspeed is not a test dependency: healthgpt/training/configs/README.md)."""

import numpy as np
import pytest
import torch
from PIL import Image

import hlora
from healthgpt import HealthGPT, HealthGPTConfig
from healthgpt.model.config import _plugins

pytestmark = pytest.mark.usefixtures("one_thread")

COMP_CONV = [{"from": "human", "value": "<image>\nWhat organ is shown?"}, {"from": "gpt", "value": "The liver."}]
GEN_CONV = [{"from": "human", "value": "<image>\nConvert this CT to an MRI."}]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = HealthGPT(HealthGPTConfig.preset("tiny", plugins=_plugins(8, 16, dropout=0.0)))
    with torch.no_grad():  # B starts at zero: make every plugin path carry gradient to A and the router
        for layer in hlora.adapter_layers(m.llm):
            for p in layer.plugins.values():
                p.B.normal_(0, 0.05)
    return m.train()


TEXT_CONV = [{"from": "human", "value": "Which organ filters blood?"}, {"from": "gpt", "value": "The kidney."}]


def _batch(model, tasks, seed):
    samples = []
    for i, t in enumerate(tasks):
        if t == "text":  # a comprehension sample without an image: no projector runs
            samples.append(model.prepare_sample(TEXT_CONV, "comp"))
            continue
        rng = np.random.default_rng(seed + i)
        image = Image.fromarray(rng.integers(0, 256, (37, 29, 3), dtype=np.uint8))
        if t == "comp":
            samples.append(model.prepare_sample(COMP_CONV, "comp", image=image))
        else:
            codes = torch.randint(0, model.num_image_codes, (model.num_image_codes,),
                                  generator=torch.Generator().manual_seed(seed + i))
            samples.append(model.prepare_sample(GEN_CONV, "gen", image=image, target=codes))
    return model.collate(samples)


def _backward(model, batch, every_part):
    """-> (loss, names in gradient-ready order, {name: grad or None})."""
    model.run_every_part = every_part
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    order, hooks = [], [p.register_post_accumulate_grad_hook(lambda p, n=n: order.append(n)) for n, p in params.items()]
    try:
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
    finally:
        model.run_every_part = False
        for h in hooks:
            h.remove()
    return loss.detach(), order, {n: None if p.grad is None else p.grad.clone() for n, p in params.items()}


def test_every_process_produces_every_gradient_in_the_same_order(model):
    one_task, mixed = _batch(model, ["gen", "gen"], seed=3), _batch(model, ["comp", "gen"], seed=11)
    idle = [n for n, _ in model.named_parameters() if ".plugins.comp." in n or n.startswith("projectors.comp.")]
    assert idle

    loss_ref, order_one, grads_ref = _backward(model, one_task, every_part=False)
    _, order_mixed, _ = _backward(model, mixed, every_part=False)
    assert all(grads_ref[n] is None for n in idle)  # what made ZeRO-2's buckets differ
    assert order_one != order_mixed

    loss, order_one, grads = _backward(model, one_task, every_part=True)
    _, order_mixed, grads_mixed = _backward(model, mixed, every_part=True)
    assert order_one == order_mixed and sorted(order_one) == sorted(grads)  # each parameter once, same order
    _, order_text, grads_text = _backward(model, _batch(model, ["text", "text"], seed=5), every_part=True)
    assert order_text == order_mixed  # no image anywhere: the projectors still run, on zero rows
    assert all(not grads_text[n].any() for n in grads_text if n.startswith("projectors."))
    assert all(g is not None and torch.isfinite(g).all() for g in grads_mixed.values())
    for n in idle:
        assert grads[n] is not None and not grads[n].any(), n
    assert torch.isfinite(loss) and torch.allclose(loss, loss_ref, rtol=1e-6, atol=0)
    for n, g in grads_ref.items():
        if g is not None:
            assert g.abs().max() > 0, n
            assert torch.allclose(grads[n], g, rtol=1e-4, atol=1e-6 * g.abs().max().item()), n
