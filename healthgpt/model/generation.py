"""Autoregressive decoding with a KV cache, for text answers and constrained image-token answers.

A batch may mix both kinds of rows (the hard router picks each row's plugin beforehand):

- text rows: any token; a row stops at a stop token (not returned) or after ``max_new_tokens``.
- image rows: the prompt ends with ``<start_index>``; steps 0 .. n-1 choose only among the n
  ``<idx_*>`` tokens (the choice is made over their logits alone, which is the same as masking every
  other token to -inf), step n is ``<end_index>``. Exactly n codes then ``<end_index>``, always.

Prompts are left-padded; positions count real tokens only: ``position = cumsum(mask) - 1``.
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

__all__ = ["logits_warpers", "sample_next", "decode"]


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
    steps = max(n + 1 if bool(img.any()) else 0, max_new_tokens if bool(txt.any()) else 0)
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
