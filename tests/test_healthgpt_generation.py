"""Decoding on the tiny preset: constrained image-token generation, text answers, batching, sampling."""

import numpy as np
import pytest
import torch
from PIL import Image

from healthgpt import HealthGPT
from healthgpt.model.generation import logits_warpers, sample_next


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = HealthGPT("tiny").eval()
    with torch.no_grad():  # distinct code rows, so greedy decoding does not pick <idx_0> forever
        for w in (m.llm.get_input_embeddings().weight, m.llm.get_output_embeddings().weight):
            w[m.gen_vocab.base_size:] += torch.randn_like(w[m.gen_vocab.base_size:])
    return m


def _image(seed, size=(48, 32)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_generate_image_is_exactly_1024_codes_then_end(model):
    v = model.gen_vocab
    out = model.generate([_image(0), None], ["Convert this CT to MRI.", "A normal chest X-ray."], "gen")
    for ids in out:
        assert len(ids) == model.num_image_codes + 1 == 1025
        assert ids[-1] == v.end
        assert all(v.code0 <= t < v.code0 + v.num_codes for t in ids[:-1])
    assert len(set(out[0][:-1])) > 1  # greedy over distinct rows, not one repeated token
    # the static path (default) and the eager DynamicCache loop agree over all 1025 steps
    assert out == model.generate([_image(0), None], ["Convert this CT to MRI.", "A normal chest X-ray."], "gen", static=False)
    image = model.generate_image(_image(0), "Convert this CT to MRI.")
    assert isinstance(image, Image.Image) and image.size == (256, 256) and image.mode == "RGB"
    want = model.image_tokenizer.decode_images(torch.tensor([out[0][:-1]]) - v.code0)[0]
    assert np.array_equal(np.asarray(image), np.asarray(want))


def test_generation_prompt_ends_with_start_index(model):
    ids = model._prompt_ids(True, "Make an MRI.", "gen")
    assert ids[-1] == model.gen_vocab.start
    assert model._prompt_ids(True, "What is it?", "comp")[-1] != model.gen_vocab.start


def test_sampling_stays_in_code_range_and_is_seeded(model):
    kw = dict(do_sample=True, temperature=1.5, top_k=50, top_p=0.9, seed=1)
    a = model.generate([None, None], ["A brain MRI.", "A brain MRI."], "gen", **kw)
    b = model.generate([None, None], ["A brain MRI.", "A brain MRI."], "gen", **kw)
    v = model.gen_vocab
    assert a == b and a[0] != a[1]  # same seed, same draws; two rows, two draws
    for ids in a:
        assert len(ids) == 1025 and ids[-1] == v.end and all(v.code0 <= t < v.code0 + v.num_codes for t in ids[:-1])
    # a mixed batch through the warpers: top_k=1 keeps one token per step, so sampling is greedy decoding
    texts, tasks = ["Describe it.", "A brain MRI."], ["comp", "gen"]
    greedy = model.generate([None, None], texts, tasks, max_new_tokens=5)
    assert model.generate([None, None], texts, tasks, max_new_tokens=5, do_sample=True, top_k=1, temperature=0.5,
                          seed=3) == greedy


def test_answer_and_batched_answers_agree(model):
    images, questions = [_image(1), _image(2, (30, 60)), None], ["What is shown?", "Any fracture?", "What is a CT?"]
    batched = model.generate(images, questions, "comp", max_new_tokens=6)
    single = [model.generate([i], [q], "comp", max_new_tokens=6)[0] for i, q in zip(images, questions)]
    assert batched == single and all(len(ids) == 6 for ids in batched)
    answers = model.answer_batch(images, questions, max_new_tokens=6)
    assert answers == [model.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in batched]
    assert model.answer(images[0], questions[0], max_new_tokens=6) == answers[0]


def test_mixed_task_batch_routes_each_sample(model):
    images, texts = [_image(3), _image(3)], ["Describe it.", "Describe it."]
    mixed = model.generate(images, texts, ["comp", "gen"], max_new_tokens=5)
    assert mixed[0] == model.generate(images[:1], texts[:1], "comp", max_new_tokens=5)[0]
    assert mixed[1] == model.generate(images[1:], texts[1:], "gen")[0]
    out = model.infer(images[:1] * 2, texts[:1] * 2, ["comp", "comp"], max_new_tokens=5)
    assert out == [model.tokenizer.decode(mixed[0], skip_special_tokens=True).strip()] * 2


def test_text_stops_at_end_token(model):
    end = model.tokenizer.convert_tokens_to_ids("<|end|>")
    bias = torch.zeros(model.llm.get_output_embeddings().weight.shape[0])
    bias[end] = 1e4  # <|end|> wins at once: the answer is empty
    model.llm.lm_head.bias = torch.nn.Parameter(bias, requires_grad=False)
    try:
        assert model.generate([None], ["Hi"], "comp", max_new_tokens=7) == [[]]
    finally:
        model.llm.lm_head.bias = None
    assert len(model.generate([None], ["Hi"], "comp", max_new_tokens=7)[0]) == 7


def test_sample_next():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0]])
    assert sample_next(logits).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, do_sample=True, top_k=2, generator=g).item() for _ in range(200)}
    assert picks == {1, 3}
    picks = {sample_next(logits, do_sample=True, top_p=0.5, generator=g).item() for _ in range(50)}
    assert picks == {1}
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        sample_next(logits, do_sample=True, top_k=-2)


def _reference_probs(logits, temperature, top_k, top_p):
    """float64, row by row: softmax(logits / T) over the top_k largest, then the most probable of
    those down to where the probability before a token reaches top_p, renormalised."""
    out = np.zeros(logits.shape)
    for b, row in enumerate(logits.astype(np.float64) / temperature):
        order = np.argsort(-row)[:top_k]
        p = np.exp(row[order] - row[order].max())
        p /= p.sum()
        before = np.cumsum(p) - p
        assert np.abs(before - top_p).min() > 1e-4  # no token sits on the top-p boundary
        keep = order[before < top_p]
        q = np.exp(row[keep] - row[keep].max())
        out[b, keep] = q / q.sum()
    return out


def test_warpers_match_an_independent_computation():
    rng = np.random.default_rng(7)
    logits = rng.normal(0, 2, (3, 37)).astype(np.float32)
    want = _reference_probs(logits, 0.7, 11, 0.8)
    scores = torch.full((3, 37), float("nan"))
    scores.copy_(torch.from_numpy(logits))
    got = torch.softmax(logits_warpers(0.7, 11, 0.8)(None, scores), dim=-1).double().numpy()
    assert not np.isnan(got).any()
    assert np.array_equal(got > 0, want > 0) and 1 < (want > 0).sum(axis=1).min() < 11
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # sampling draws from that distribution and never outside the kept tokens
    g = torch.Generator().manual_seed(3)
    draws = sample_next(torch.from_numpy(logits[1]).expand(20000, 37), do_sample=True, temperature=0.7,
                        top_k=11, top_p=0.8, generator=g).numpy()
    freq = np.bincount(draws, minlength=37) / draws.size
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(want[1]))
    assert np.abs(freq - want[1]).max() < 0.015
