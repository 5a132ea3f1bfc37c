"""HealthGPT's training loss computes ``lm_head`` only at supervised positions: the same loss, gradients and
per-task log as the full-logits loss (transformers' ``ForCausalLMLoss`` over every position), checked in
float64 on a random tiny model, both tasks, a right-padded batch."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TrainingArguments

import hlora
from healthgpt import IGNORE_INDEX, TASKS, HealthGPT, HealthGPTConfig
from healthgpt.model.config import TINY_VQ, _plugins
from healthgpt.training.trainer import HealthGPTTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

CONVS = {
    "comp": [{"from": "human", "value": "<image>\nWhich organ is shown?"}, {"from": "gpt", "value": "The liver, left lobe."}],
    "comp_short": [{"from": "human", "value": "<image>\nCT?"}, {"from": "gpt", "value": "Yes"}],
    "gen": [{"from": "human", "value": "<image>\nConvert this CT to an MRI."}],
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    vq = dict(TINY_VQ, resolution=32, attn_resolutions=(4,))  # 16 codes per generated image
    m = HealthGPT(HealthGPTConfig.preset("tiny", plugins=_plugins(8, 16, dropout=0.0), image_tokenizer_config=vq))
    with torch.no_grad():  # non-trivial plugins and generation rows
        for layer in hlora.adapter_layers(m.llm):
            for p in layer.plugins.values():
                p.B.normal_(0, 0.05)
        for w in (m.llm.get_input_embeddings().weight, m.llm.get_output_embeddings().weight):
            w[m.gen_vocab.base_size:] += torch.randn_like(w[m.gen_vocab.base_size:]) * 0.1
    m.set_trainable(plugins=TASKS, projectors=TASKS, fusion=True)
    return m


def _image(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (37, 29, 3), dtype=np.uint8))


def _batch(model):
    """comp, gen, short comp (right-padded), gen: supervised spans of different lengths."""
    samples = []
    for i, kind in enumerate(["comp", "gen", "comp_short", "gen"]):
        if kind == "gen":
            codes = torch.randint(0, 8192, (model.num_image_codes,), generator=torch.Generator().manual_seed(i))
            samples.append(model.prepare_sample(CONVS[kind], "gen", image=_image(i), target=codes))
        else:
            samples.append(model.prepare_sample(CONVS[kind], "comp", image=_image(i)))
    batch = model.collate(samples)
    assert (batch["attention_mask"] == 0).any()  # padding is there
    return batch


def _reference(model, batch):
    """float64 copy: full logits of every position -> (mean token CE, per-sample CE sums, supervised counts,
    gradients), the CE written out as logsumexp - target logit."""
    ref = copy.deepcopy(model).double()
    ref.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = ref(**{**inputs, "images": batch["images"].double()}).logits
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    lp = logits[:, :-1]
    token = torch.logsumexp(lp, -1) - lp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token = torch.where(mask, token, torch.zeros_like(token))
    loss = token.sum() / mask.sum()
    loss.backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    return loss.detach(), token.sum(1).detach(), mask.sum(1), grads


@pytest.mark.parametrize("return_logits", [False, True])
def test_loss_and_gradients_match_the_full_logits_loss(model, return_logits):
    batch = _batch(model)
    want_loss, want_sums, want_counts, want_grads = _reference(model, batch)
    model.zero_grad(set_to_none=True)
    out = model(**batch, return_logits=return_logits)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.token_loss_sum.double(), want_sums, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.token_count, want_counts) and (want_counts > 0).all()
    assert not out.token_loss_sum.requires_grad
    assert (out.logits is None) != return_logits
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == set(want_grads) and len(got) > 10
    for name, g in got.items():
        assert g is not None and torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # the gradient reached both tasks' image side
    assert got["projectors.comp.0.weight"].abs().sum() > 0 and got["projectors.gen.0.weight"].abs().sum() > 0


def test_logits_and_num_items_in_batch(model):
    batch = _batch(model)
    with torch.no_grad():
        plain = model(**{k: v for k, v in batch.items() if k != "labels"})
        full = model(**batch)
        skipped = model(**batch, return_logits=False, num_items_in_batch=torch.tensor(1000))
    assert full.logits.shape == plain.logits.shape and torch.equal(full.logits, plain.logits)
    assert not hasattr(plain, "token_loss_sum") or plain.token_loss_sum is None
    # the Trainer's count over an accumulated batch: a token sum divided by it
    torch.testing.assert_close(skipped.loss * 1000, full.loss * full.token_count.sum(), rtol=1e-5, atol=1e-4)
    # the HF model's own loss (ForCausalLMLoss over every position's logits) agrees
    with torch.no_grad():
        embeds = model.embed_inputs(batch["input_ids"], batch["images"], batch["tasks"])
        model.route(batch["tasks"])
        hf = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"])
    torch.testing.assert_close(full.loss, hf.loss, rtol=1e-5, atol=1e-6)


def test_trainer_logs_per_task_losses_of_the_full_logits(model, tmp_path):
    batch = _batch(model)
    _, want_sums, want_counts, _ = _reference(model, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    trainer = HealthGPTTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                               param_groups=[{"name": "all", "lr": 1e-3, "params": params}])
    model.train()
    try:
        loss, out = trainer.compute_loss(model, dict(batch), return_outputs=True)
    finally:
        model.eval()
    assert out.logits is None  # training asks for no logits of every position
    logs = {"loss": loss.item()}
    trainer.log(logs)
    for task in TASKS:
        rows = [b for b, t in enumerate(batch["tasks"]) if t == task]
        want = float(want_sums[rows].sum() / want_counts[rows].sum())
        assert logs[f"loss_{task}"] == pytest.approx(want, rel=1e-5), task
    assert logs["loss_comp"] != pytest.approx(logs["loss_gen"], rel=1e-3)
