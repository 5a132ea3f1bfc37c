"""Static-shape decoding: one preallocated KV cache, a step of fixed shapes, no host synchronisation
inside the loop, and on CUDA the step captured once in a CUDA graph and replayed.

The rules are ``healthgpt.model.generation``'s (exactly n codes then ``<end_index>`` for image rows,
text rows up to a stop token or ``max_new_tokens``); the difference is how the work is laid out:

- cache: one transformers ``StaticLayer`` per decoder layer, ``L = T + steps`` columns, shared by all
  rows. Prompts are left-padded to T; generated token s of every row is written to column ``T + s``.
- masks: built here as 4D boolean masks (True = attend), so nothing in the step depends on host data.
  Key j is visible to query column i iff ``j <= i`` and ``j > i - W`` (W: the model's sliding window,
  if any) and key j is a real token; a padding query sees only itself (its output is never read,
  but it must stay finite: its keys and values sit in the cache). Positions count real tokens only,
  ``cumsum(mask) - 1``, as in the eager path.
- step: ``tokens [B, 1] -> code logits [B, n_codes] and/or text logits [B, V]`` reading the write
  column from the cache's own device counter; the positions advance on the device.
- selection and stop conditions run on the device after each step; the host looks at the ``done``
  flags only every ``check_every`` steps, and copies the tokens back once at the end.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, StaticLayer

__all__ = ["StaticDecoder", "prefill_mask", "masked_attention"]

# attention implementations that take the 4D boolean masks built here
MASKED_ATTENTION = ("sdpa", "eager")


@contextlib.contextmanager
def masked_attention(llm):
    """Within the block the LLM attends through SDPA if its implementation cannot take a 4D mask
    (flash_attention_2 reads only a 2D padding mask); the implementation is restored afterwards."""
    previous = llm.config._attn_implementation
    if previous in MASKED_ATTENTION:
        yield
        return
    llm.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        llm.set_attn_implementation(previous)


def prefill_mask(real: torch.Tensor, max_len: int, window: int | None) -> torch.Tensor:
    """[B, T] real-token mask -> the prompt's [B, 1, T, L] boolean attention mask over L cache columns."""
    T = real.shape[1]
    q = torch.arange(T, device=real.device)[:, None]
    k = torch.arange(max_len, device=real.device)[None, :]
    visible = k <= q
    if window is not None:
        visible = visible & (k > q - window)
    key_real = F.pad(real.bool(), (0, max_len - T), value=False)
    return (visible[None] & (key_real[:, None, :] | (k == q)[None]))[:, None]


class StaticDecoder:
    """One batch's decoding state: the static KV cache and the fixed-shape step (module docstring).

    Args:
        llm: a ``Phi3ForCausalLM``-like causal LM (``llm.model`` returns ``last_hidden_state``), routed.
        attention_mask: [B, T] prompt mask (1 = real token, left padding).
        steps: the most tokens generated per row; the cache holds ``T + steps`` columns.
        code_head / text_head: ``(weight, bias)`` of the heads the batch needs (``None`` when no row
            uses it): the ``<idx_*>`` rows of the output embeddings, and the whole output embeddings.
        use_graph: capture the step in a CUDA graph (CUDA only; ``None``: on CUDA devices).
    """

    def __init__(self, llm, attention_mask: torch.Tensor, steps: int, code_head, text_head, use_graph: bool | None = None):
        self.llm = llm
        self.device = attention_mask.device
        self.batch, self.prompt_len = attention_mask.shape
        self.max_len = self.prompt_len + steps
        self.window = getattr(llm.config, "sliding_window", None)
        self.code_head, self.text_head = code_head, text_head
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        if self.use_graph and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the batch is on {self.device}")
        # every decoder layer gets a full-length static layer: a sliding window is applied by the mask
        self.cache = Cache(layers=[StaticLayer(max_cache_len=self.max_len) for _ in range(llm.config.num_hidden_layers)])
        real = attention_mask.bool()
        self.real = real
        self.key_real = F.pad(real, (0, steps), value=True)[:, None, None, :]  # generated columns are real
        self.columns = torch.arange(self.max_len, device=self.device)
        self.positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -1:] + 1  # [B, 1], next position
        self.tokens = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        self._graph = None
        self._outputs = None
        self._steps_run = 0

    # ---- the model calls ------------------------------------------------------------------------

    def _heads(self, hidden: torch.Tensor):
        code = None if self.code_head is None else F.linear(hidden, *self.code_head)
        text = None if self.text_head is None else F.linear(hidden, *self.text_head)
        return code, text

    def prefill(self, inputs_embeds: torch.Tensor):
        """Run the prompts [B, T, H] into the cache -> the first step's (code logits, text logits)."""
        positions = (self.real.long().cumsum(-1) - 1).clamp(min=0)
        mask = prefill_mask(self.real, self.max_len, self.window)
        out = self.llm.model(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions,
                             cache=self.cache, use_cache=True)
        return self._heads(out.last_hidden_state[:, -1])

    def step_fn(self):
        """The fixed-shape step on the static buffers: feed ``self.tokens`` -> (code logits, text logits).
        Reads the write column from the cache's device counter and advances ``self.positions``."""
        current = self.cache.layers[0].cumulative_length  # the column this step writes
        visible = self.columns <= current
        if self.window is not None:
            visible = visible & (self.columns > current - self.window)
        mask = self.key_real & visible
        out = self.llm.model(input_ids=self.tokens, attention_mask=mask, position_ids=self.positions,
                             cache=self.cache, use_cache=True)
        self.positions.add_(1)
        return self._heads(out.last_hidden_state[:, -1])

    def step(self, tokens: torch.Tensor):
        """Feed the chosen tokens [B] -> the next (code logits, text logits). On CUDA with ``use_graph`` the
        first call runs eagerly on a side stream (warm-up: autotuning, workspaces, routing tensors), the
        second captures the step, and every later call replays it; the returned tensors are then the
        graph's static outputs, overwritten by the next call."""
        if self._steps_run >= self.max_len - self.prompt_len:
            raise RuntimeError(f"the static cache holds {self.max_len} columns; no room for another step")
        self.tokens.copy_(tokens.view(-1, 1))
        self._steps_run += 1
        if not self.use_graph:
            return self.step_fn()
        if self._graph is not None:
            self._graph.replay()
            return self._outputs
        if self._steps_run == 1:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                outputs = self.step_fn()
            torch.cuda.current_stream(self.device).wait_stream(side)
            return outputs
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):  # records, runs nothing
            self._outputs = self.step_fn()
        self._graph.replay()
        return self._outputs
