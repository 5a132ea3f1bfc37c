"""The static decode path (static KV cache, device-side stop tracking, the step a CUDA graph captures)
against the eager DynamicCache loop, token for token, on the tiny preset."""

import numpy as np
import pytest
import torch
from PIL import Image

from healthgpt import HealthGPT
from healthgpt.model.config import TINY_PHI3, HealthGPTConfig
from healthgpt.model.decode_static import StaticDecoder, prefill_mask
from healthgpt.model.generation import decode, decode_eager
from hlora.model import adapter_layers


pytestmark = pytest.mark.usefixtures("one_thread")


def _lively(m):
    """Weights that make the answer depend on the prompt and the plugin: unit-gain random layers,
    non-zero plugin B, and distinct code rows (else greedy decoding picks <idx_0> forever)."""
    with torch.no_grad():
        for name, p in m.llm.model.layers.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5 * (1.5 if name.endswith(".B") else 1.0))
        for w in (m.llm.get_input_embeddings().weight, m.llm.get_output_embeddings().weight):
            w[m.gen_vocab.base_size:] += torch.randn_like(w[m.gen_vocab.base_size:])
    return m


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return _lively(HealthGPT("tiny").eval())


def _image(seed, size=(48, 32)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _inputs(m, images, texts, tasks):
    """What ``HealthGPT.generate`` hands the decoder: left-padded prompt embeddings, mask, routing set."""
    prompts = [m._prompt_ids(im is not None, tx, t) for im, tx, t in zip(images, texts, tasks)]
    T = max(map(len, prompts))
    ids = torch.full((len(prompts), T), m.pad_id)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = torch.tensor(p), 1
    present = [im for im in images if im is not None]
    pixels = m.image_processor(present) if present else None
    with torch.no_grad():
        embeds = m.embed_inputs(ids, pixels, tasks)
    m.route(tasks)
    return embeds, mask


def test_mixed_batch_of_different_lengths_matches_eager(model):
    """gen and comp rows, with and without images, prompts of different lengths sharing one cache.
    Image rows answer with n = 40 codes here (the rules do not depend on n; 1024 through ``generate``
    is ``test_healthgpt_generation``'s test, which runs the static path)."""
    images = [_image(0), None, _image(1, (30, 60)), None]
    texts = ["Convert this CT to MRI.", "What is a CT scan, and when is it used instead of an MRI?", "Any fracture?",
             "A chest X-ray."]
    tasks = ["gen", "comp", "comp", "gen"]
    embeds, mask = _inputs(model, images, texts, tasks)
    assert len(set(mask.sum(1).tolist())) == 4 and int(mask[:, 0].sum()) == 1  # every row padded differently
    args = (model.llm, embeds, mask, [t == "gen" for t in tasks], 40, model.gen_vocab, model.stop_ids, model.pad_id, 9)
    static, eager = decode(*args), decode_eager(*args)
    assert static == eager
    v = model.gen_vocab
    for b in (0, 3):
        assert len(static[b]) == 41 and static[b][-1] == v.end
        assert all(v.code0 <= t < v.code0 + v.num_codes for t in static[b][:-1])
    assert static[0] != static[3] and static[1] != static[2]
    assert all(len(static[b]) == 9 for b in (1, 2))
    model.route(["comp"])
    alone = decode(model.llm, embeds[1:2, -int(mask[1].sum()):], mask[1:2, -int(mask[1].sum()):], [False], 40,
                   v, model.stop_ids, model.pad_id, 9)
    assert alone[0] == static[1]  # padding changes nothing


@pytest.mark.parametrize("check_every", [1, 4])
def test_rows_stopping_at_different_steps_match_eager(model, check_every):
    images, texts, tasks = [None, _image(2), None], ["Hi", "What is shown here?", "Name three bones."], ["comp"] * 3
    embeds, mask = _inputs(model, images, texts, tasks)
    args = (model.llm, embeds, mask, [False] * 3, model.num_image_codes, model.gen_vocab)
    free = decode_eager(*args, model.stop_ids, model.pad_id, 12)
    assert all(len(r) == 12 for r in free)
    stops = model.stop_ids | {free[0][2], free[1][6]}  # tokens rows 0 and 1 reach at different steps
    want = [next((i for i, t in enumerate(r) if t in stops), 12) for r in free]
    assert len(set(want)) == 3
    eager = decode_eager(*args, stops, model.pad_id, 12)
    static = decode(*args, stops, model.pad_id, 12, check_every=check_every)
    assert static == eager == [r[:n] for r, n in zip(free, want)]


def test_sliding_window_matches_eager():
    """Phi-3-mini attends through a sliding window; the static cache keeps every column and masks."""
    torch.manual_seed(1)
    m = _lively(HealthGPT(HealthGPTConfig.preset("tiny", llm_config=dict(TINY_PHI3, sliding_window=9))).eval())
    images, texts, tasks = [None, _image(4)], ["Why?", "Describe the image in detail."], ["comp", "comp"]
    static = m.generate(images, texts, tasks, max_new_tokens=14)
    eager = m.generate(images, texts, tasks, max_new_tokens=14, static=False)
    assert static == eager and all(len(r) == 14 for r in static)


def test_prefill_mask_against_a_loop():
    real = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 1, 1]])
    for window in (None, 2):
        got = prefill_mask(real, 8, window)
        assert got.shape == (3, 1, 5, 8) and got.dtype == torch.bool
        for b in range(3):
            for i in range(5):
                for j in range(8):
                    want = j <= i and (window is None or j > i - window) and (bool(real[b, j]) or j == i)
                    assert bool(got[b, 0, i, j]) == want, (b, i, j, window)


def test_step_traces_whole_without_host_syncs(model):
    """The step a CUDA graph captures: traced as one graph (fullgraph: a ``.item()``, ``.tolist()`` or
    any branch on tensor data would break it), it gives the eager step's logits, step after step."""
    images, texts, tasks = [_image(5), None], ["Describe it.", "A brain MRI, axial."], ["comp", "gen"]
    embeds, mask = _inputs(model, images, texts, tasks)
    head = model.llm.get_output_embeddings()
    codes = slice(model.gen_vocab.code0, model.gen_vocab.code0 + model.gen_vocab.num_codes)
    heads = ((head.weight[codes], None), (head.weight, None))
    with torch.no_grad():
        # ref: the CPU layout (attends the columns written so far); traced: the one shape a CUDA graph captures
        ref, traced = StaticDecoder(model.llm, mask, 4, *heads), StaticDecoder(model.llm, mask, 4, *heads, live_columns=False)
        _, logits = ref.prefill(embeds)
        traced.prefill(embeds)
        tokens = logits.argmax(-1)
        _, warm = traced.step(tokens)  # eager first step, as on CUDA before capture
        # all L columns (the unwritten ones masked) against the written ones only: summed in another order
        want = ref.step(tokens)[1]
        torch.testing.assert_close(warm, want, rtol=1e-4, atol=2e-5 * float(want.abs().max()))
        step = torch.compile(traced.step_fn, fullgraph=True, backend="eager")
        for _ in range(2):
            tokens = warm.argmax(-1)
            code_ref, text_ref = ref.step(tokens)
            traced.tokens.copy_(tokens[:, None])
            code, text = step()
            assert not text.isnan().any()
            # traced, SDPA takes GQA heads repeated instead of packed: the same math, summed in another order
            for got, want in ((code, code_ref), (text, text_ref)):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5 * float(want.abs().max()))
            warm = text
        assert int(traced.cache.layers[0].cumulative_length) == mask.shape[1] + 3
        assert torch.equal(traced.positions, ref.positions)
        ref.step(tokens)  # the fourth and last step the cache has room for
        with pytest.raises(RuntimeError, match="no room"):
            ref.step(tokens)


def test_decoder_is_kept_per_key_and_reused_for_prompts_of_other_lengths(model):
    """``decoder_for``: a second batch of the same size and routing, prompts of other lengths, reuses
    the kept decoder (its cache and, on CUDA, its captured graph; the kept routing objects go back on
    the layers); new routing, an in-place weight update or a merged plugin get a new one; at most
    ``MAX_KEPT_DECODERS`` are kept. Every result equals the eager path's."""
    from healthgpt.model.decode_static import _KEPT_ATTR, MAX_KEPT_DECODERS

    llm, v = model.llm, model.gen_vocab
    llm.__dict__.pop(_KEPT_ATTR, None)

    def both(images, texts, tasks):
        embeds, mask = _inputs(model, images, texts, tasks)
        args = (llm, embeds, mask, [t == "gen" for t in tasks], 40, v, model.stop_ids, model.pad_id, 9)
        static = decode(*args)
        assert static == decode_eager(*args)
        return static, mask

    first, mask1 = both([_image(6), None], ["A knee MRI.", "Name three bones."], ["gen", "comp"])
    kept = llm.__dict__[_KEPT_ATTR]
    (decoder, routing), = kept.values()
    second, mask2 = both([_image(7), None], ["Convert this knee MRI to a CT scan, please.", "Why?"], ["gen", "comp"])
    assert mask1.shape[1] != mask2.shape[1] and first != second
    assert len(kept) == 1 and next(iter(kept.values()))[0] is decoder  # reused: one shape bucket, same routing
    assert all(layer.routing is routing for layer in adapter_layers(llm))
    both([None, _image(8)], ["Why?", "Describe it."], ["comp", "comp"])  # other routing
    assert len(kept) == 2
    plugin = adapter_layers(llm)[0].plugins["gen"]
    with torch.no_grad():
        plugin.B.mul_(3.0)  # in place: same storage, new version
    try:
        changed, _ = both([_image(7), None], ["Convert this knee MRI to a CT scan, please.", "Why?"], ["gen", "comp"])
        assert len(kept) == 3 and changed != second
    finally:
        with torch.no_grad():
            plugin.B.div_(3.0)
    for b in range(MAX_KEPT_DECODERS):  # other batch sizes
        both([None] * (b + 3), ["Why?"] * (b + 3), ["comp"] * (b + 3))
    assert len(kept) == MAX_KEPT_DECODERS and all(d is not decoder for d, _ in kept.values())
    with pytest.raises(ValueError, match="holds 3 rows"):
        next(iter(kept.values()))[0].reset(mask1, 4)


def test_compiled_step_matches_eager_and_compiles_once(model):
    """``decode(compile=True)``: the step through ``torch.compile`` (inductor, fullgraph) gives the eager
    loop's tokens on a mixed batch (gen and comp rows, left padding); it is compiled once (no
    recompilation from step to step: positions and the write column are tensors, and the count of
    columns attention reads, which grows every step, is a dynamic dimension), and a second batch of
    other prompt lengths reuses the kept decoder and its compiled step without recompiling."""
    from torch._dynamo.utils import counters

    from healthgpt.model.decode_static import _KEPT_ATTR

    llm, v = model.llm, model.gen_vocab
    llm.__dict__.pop(_KEPT_ATTR, None)
    torch._dynamo.reset()
    counters.clear()

    def both(images, texts, tasks):
        embeds, mask = _inputs(model, images, texts, tasks)
        args = (llm, embeds, mask, [t == "gen" for t in tasks], 24, v, model.stop_ids, model.pad_id, 9)
        compiled = decode(*args, compile=True)
        assert compiled == decode_eager(*args)
        return compiled, mask

    with torch._dynamo.config.patch(error_on_recompile=True):  # 23 compiled steps, 23 column counts
        first, mask1 = both([_image(9), None, _image(10, (30, 60))], ["A knee MRI.", "Name three bones.",
                                                                      "Any fracture?"], ["gen", "comp", "comp"])
    assert len(set(mask1.sum(1).tolist())) == 3  # every row padded differently
    assert len(first[0]) == 25 and first[0][-1] == v.end and all(len(r) == 9 for r in first[1:])
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    (decoder, _), = llm.__dict__[_KEPT_ATTR].values()
    assert decoder._compiled is not None and decoder._calls == 24 and decoder.live_columns
    with torch._dynamo.config.patch(error_on_recompile=True):
        second, mask2 = both([_image(11), None, _image(12)], ["Convert this knee MRI to a CT scan, please.", "Why?",
                                                               "Describe it."], ["gen", "comp", "comp"])
    assert mask2.shape[1] != mask1.shape[1] and second != first
    assert counters["stats"]["unique_graphs"] == 1 and decoder._calls == 48
    with pytest.raises(ValueError, match="needs static=True"):
        model.generate([None], ["Why?"], "comp", static=False, compile=True)


def test_each_compiled_decoder_holds_its_own_graph(model, monkeypatch):
    """Dynamo keeps at most ``recompile_limit`` graphs per code object and, under ``fullgraph``, fails
    past it: decoders of more shapes than that in one process each compile their own copy of the step
    (here with the limit at 1, two shapes, traced by a backend that keeps the graphs and runs them as
    traced, to keep the test short), steps attending over more columns each reuse it, and each
    compiled step gives the eager step's logits. The batch is mixed (comp and gen rows): the graph
    reads each layer's plugin stack as the first, eager step built it, and concatenates no plugin
    tensor."""
    graphs = []

    def keep(graph, inputs):
        graphs.append(graph)
        return graph.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": keep}))
    images, texts, tasks = [_image(13), None], ["Describe it.", "A brain MRI, axial."], ["comp", "gen"]
    embeds, mask = _inputs(model, images, texts, tasks)
    head = model.llm.get_output_embeddings()
    torch._dynamo.reset()
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1):
        for max_len in (mask.shape[1] + 3, mask.shape[1] + 5):
            eager = StaticDecoder(model.llm, mask, 3, None, (head.weight, None), max_len=max_len, live_columns=False)
            compiled = StaticDecoder(model.llm, mask, 3, None, (head.weight, None), max_len=max_len, compile=True)
            assert compiled.live_columns and not eager.live_columns
            for decoder in (eager, compiled):
                tokens = decoder.prefill(embeds)[1].argmax(-1)
            for _ in range(3):  # the first eager, then compiled
                want, got = eager.step(tokens)[1], compiled.step(tokens)[1]
                # traced, SDPA takes GQA heads repeated instead of packed: the same math, summed in another order
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
                tokens = want.argmax(-1)
    assert len(graphs) == 2
    for graph in graphs:
        inputs = [n.name for n in graph.graph.nodes if n.op == "placeholder"]
        assert sum("_stack_cache_" in name for name in inputs) == 3 * len(adapter_layers(model.llm))  # A, B, router
        cats = [n for n in graph.graph.nodes if n.target in (torch.cat, torch.ops.aten.cat.default)]
        assert cats  # the rotary embedding's: the graph holds the concatenations the model does
        assert not [n for n in cats if any("_plugins_" in getattr(a, "name", "") for a in n.args[0])]
