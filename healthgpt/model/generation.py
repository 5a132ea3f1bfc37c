"""Autoregressive decoding with a KV cache, for text answers and constrained image-token answers.

A batch may mix both kinds of rows (the hard router picks each row's plugin beforehand):

- text rows: any token; a row stops at a stop token (not returned) or after ``max_new_tokens``.
- image rows: the prompt ends with ``<start_index>``; steps 0 .. n-1 choose only among the n
  ``<idx_*>`` tokens (the choice is made over their logits alone, which is the same as masking every
  other token to -inf), step n is ``<end_index>``. Exactly n codes then ``<end_index>``, always.

Prompts are left-padded; positions count real tokens only: ``position = cumsum(mask) - 1``.

Two implementations of these rules: ``decode`` (the default: static shapes, one preallocated cache, no
host synchronisation inside the loop, a CUDA graph on CUDA, optionally the step compiled by
``torch.compile``; ``healthgpt.model.decode_static``) and
``decode_eager`` (a transformers forward on a growing ``DynamicCache`` per step with host-side
bookkeeping: the reference the static path is tested against).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from healthgpt.model.decode_static import decoder_for, masked_attention

__all__ = ["logits_warpers", "sample_next", "decode", "decode_eager"]


def logits_warpers(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> LogitsProcessorList:
    """transformers' sampling warpers in ``generate``'s order: temperature, top-k, top-p.

    ``logits / temperature``; then every logit below the ``top_k``-th largest is set to -inf; then,
    of the rest, tokens are kept from the most probable down until their probability reaches
    ``top_p`` (at least one token is kept). An option at its neutral value (1.0, None/0, None/1.0)
    adds no warper. Bad values (temperature <= 0, top_k < 0, top_p outside [0, 1]) raise
    transformers' ``ValueError``.
    """
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(temperature)))
    if top_k:
        warpers.append(TopKLogitsWarper(int(top_k)))
    if top_p is not None and top_p != 1.0:
        warpers.append(TopPLogitsWarper(float(top_p)))
    return warpers


def sample_next(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, V] logits -> [B] chosen indices.

    Greedy: ``argmax``. Sampling: one draw from ``softmax(logits_warpers(temperature, top_k, top_p)(logits))``
    (in float32), renormalised over the tokens the warpers keep.
    """
    if not do_sample:
        return logits.argmax(dim=-1)
    # the warpers read only the scores; their input_ids argument (the text so far) is unused
    scores = logits_warpers(temperature, top_k, top_p)(None, logits.float())
    return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def decode_eager(
    llm,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    image_rows: list,
    num_image_tokens: int,
    vocab,
    stop_ids: set,
    pad_id: int,
    max_new_tokens: int,
    **sampling,
) -> list:
    """Generate after left-padded prompts -> per row the new token ids (module docstring has the rules).

    Args:
        llm: a ``Phi3ForCausalLM`` (routing already set); ``llm.model`` and its output embeddings are called.
        inputs_embeds: [B, T, H]; attention_mask: [B, T] (1 = real token).
        image_rows: per row, whether it answers with image tokens.
        num_image_tokens: n, the codes per image (1024).
        vocab: ``GenerationVocab`` (code ids ``code0 .. code0 + num_codes - 1``, ``end``).
        sampling: ``sample_next`` options (``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``generator``).
    """
    B, device = inputs_embeds.shape[0], inputs_embeds.device
    img = torch.tensor(image_rows, dtype=torch.bool, device=device)
    txt = ~img
    n = num_image_tokens
    steps = _steps(image_rows, n, max_new_tokens)
    head = llm.get_output_embeddings()
    codes = slice(vocab.code0, vocab.code0 + vocab.num_codes)
    code_w = head.weight[codes]
    code_b = None if head.bias is None else head.bias[codes]

    mask = attention_mask.long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=llm.config)
    out = llm.model(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    hidden = out.last_hidden_state[:, -1]
    next_pos = positions[:, -1] + 1

    results = [[] for _ in range(B)]
    done = [False] * B
    for step in range(steps):
        tokens = torch.full((B,), pad_id, dtype=torch.long, device=device)
        if step < n and bool(img.any()):
            tokens[img] = vocab.code0 + sample_next(F.linear(hidden[img], code_w, code_b), **sampling)
        elif step == n:
            tokens[img] = vocab.end
        if bool(txt.any()):
            tokens[txt] = sample_next(head(hidden[txt]), **sampling)
        for b, t in enumerate(tokens.tolist()):
            if done[b]:
                continue
            if image_rows[b]:
                results[b].append(t)
                done[b] = step == n
            elif t in stop_ids:
                done[b] = True
            else:
                results[b].append(t)
                done[b] = len(results[b]) >= max_new_tokens
        if all(done):
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        out = llm.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos[:, None], cache=cache, use_cache=True)
        hidden = out.last_hidden_state[:, -1]
        next_pos = next_pos + 1
    return results


def _steps(image_rows: list, num_image_tokens: int, max_new_tokens: int) -> int:
    """The most decode steps any row can need: n + 1 for image rows, ``max_new_tokens`` for text rows."""
    return max(num_image_tokens + 1 if any(image_rows) else 0, max_new_tokens if not all(image_rows) else 0)


@torch.no_grad()
def decode(
    llm,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    image_rows: list,
    num_image_tokens: int,
    vocab,
    stop_ids: set,
    pad_id: int,
    max_new_tokens: int,
    check_every: int = 32,
    use_graph: bool | None = None,
    compile: bool = False,
    **sampling,
) -> list:
    """``decode_eager``'s contract (same arguments and results) through the static path.

    Per step, on the device: choose each row's token (codes for image rows before step n,
    ``<end_index>`` at step n, any token for text rows), write it to ``out[:, step]``, and update the
    rows' lengths and ``done`` flags; a text row is done at its first stop token (not kept) or after
    ``max_new_tokens`` tokens, an image row after step n. The host reads ``done`` every
    ``check_every`` steps (to stop early) and the tokens once at the end. ``use_graph``: capture the
    step in a CUDA graph (``None``: on CUDA). ``compile``: run the step through ``torch.compile`` (inductor;
    on CUDA inside the graph); the first call for a batch shape compiles (seconds to minutes), later
    steps and calls reuse it. The decoder (its cache, graph and compiled step) is the model's kept one
    for this batch's key when there is one (``decode_static.decoder_for``).
    """
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    B, device = inputs_embeds.shape[0], inputs_embeds.device
    n = num_image_tokens
    steps = _steps(image_rows, n, max_new_tokens)
    if steps == 0:
        return [[] for _ in range(B)]
    has_img, has_txt = any(image_rows), not all(image_rows)
    head = llm.get_output_embeddings()
    codes = slice(vocab.code0, vocab.code0 + vocab.num_codes)
    code_head = (head.weight[codes], None if head.bias is None else head.bias[codes]) if has_img else None
    text_head = (head.weight, head.bias) if has_txt else None

    img = torch.tensor(image_rows, dtype=torch.bool, device=device)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    out = torch.full((B, steps), pad_id, dtype=torch.long, device=device)
    length = torch.zeros(B, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)

    with masked_attention(llm):
        decoder = decoder_for(llm, attention_mask, steps, code_head, text_head, inputs_embeds.dtype, use_graph=use_graph,
                              compile=compile)
        code_logits, text_logits = decoder.prefill(inputs_embeds)
        for step in range(steps):
            if has_img:
                code_tokens = vocab.code0 + sample_next(code_logits, **sampling) if step < n else torch.full_like(length, vocab.end)
            if has_txt:
                text_tokens = sample_next(text_logits, **sampling)
            tokens = torch.where(img, code_tokens, text_tokens) if has_img and has_txt else code_tokens if has_img else text_tokens
            out[:, step] = tokens
            alive = ~done
            stopped = alive & ~img & torch.isin(tokens, stops)
            length += alive & ~stopped
            done |= stopped | (~img & (length >= max_new_tokens))
            if step == n:
                done |= img
            if step == steps - 1 or ((step + 1) % check_every == 0 and bool(done.all())):
                break
            code_logits, text_logits = decoder.step(tokens)
    out, length = out.cpu(), length.tolist()
    return [out[b, : length[b]].tolist() for b in range(B)]
