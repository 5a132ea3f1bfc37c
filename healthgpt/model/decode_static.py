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
- without a CUDA graph (a CPU) attention reads only the columns written so far (the host knows how
  many without asking the device): a step then costs what the eager path's does, not ``L`` columns.
  A CUDA graph replays one shape, so there every step attends over all ``L`` columns, masked (a
  capture per column count would be a graph per step).
- compiled (``compile=True``): the step runs through ``torch.compile`` (inductor, ``fullgraph``: the
  hlora op and the cache update trace as one graph, no break); on a CPU the count of columns read is
  the graph's one dynamic dimension (``torch._dynamo.mark_dynamic`` on a view of the column indices
  whose length it is), so one graph serves every step. The first step of a decoder's life runs
  eagerly (it fills the routing's per-shape caches and, for a mixed batch, each layer's stack of its
  plugins, which a traced step must find filled: a fill inside the trace would be a side effect and
  the next call a recompile; the compiled step reads those stacks, ``hlora.layer.stacks_as_built``,
  rather than concatenating the plugins' weights every step), later steps call the compiled one. On
  CUDA the hand CUDA graph below captures the compiled step (rather than ``mode="reduce-overhead"``: the
  decoder's buffers already have fixed addresses, while cudagraph trees would copy the tokens,
  positions and masks in every replay and skip a graph whose inputs are mutated in place, which the
  cache update and the position counter are; and one capture path serves both steps). The positions
  and the write column are device tensors, so steps do not recompile. Each decoder compiles a copy of
  ``step_fn``'s code: dynamo keeps its graphs per code object, at most ``recompile_limit`` (8) of
  them, and under ``fullgraph`` the ninth decoder shape of a process would be an error; a copy per
  decoder holds that decoder's graph alone and frees it with the decoder (a later decoder of the same
  shapes traces again, and finds inductor's compiled code in its on-disk cache).
- reuse (``decoder_for``): a model keeps its last few decoders, keyed on everything the captured step
  reads or depends on (batch, cache length rounded up to ``LENGTH_BUCKET`` columns, dtype, device,
  heads, the routing, every parameter's storage, merged plugins, attention implementation, compiled
  or not). A later batch with the same key, prompts of any lengths that fit, resets the buffers in
  place and replays the graph captured (or calls the step compiled) the first time.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, StaticLayer

from hlora.layer import stacks_as_built
from hlora.model import adapter_layers

__all__ = ["StaticDecoder", "prefill_mask", "masked_attention", "decoder_for", "LENGTH_BUCKET", "MAX_KEPT_DECODERS"]

# attention implementations that take the 4D boolean masks built here
MASKED_ATTENTION = ("sdpa", "eager")
# cache lengths are rounded up to a multiple of this, so batches of other prompt lengths reuse a decoder
LENGTH_BUCKET = 64
# decoders a model keeps for reuse (each holds a KV cache of batch x length columns)
MAX_KEPT_DECODERS = 4
_KEPT_ATTR = "_healthgpt_static_decoders"


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


class LiveStaticLayer(StaticLayer):
    """A ``StaticLayer`` that gives attention only its first ``len(live)`` columns (``live``: the 1-D
    tensor of those column indices, whose length is a dynamic dimension of a compiled step; ``None``:
    all ``max_cache_len``). Writes are ``StaticLayer``'s."""

    live: torch.Tensor | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self.live is None:
            return keys, values
        columns = self.live.shape[0]  # narrow, not a slice: a slice's end clamps, a branch on the length
        return keys.narrow(2, 0, columns), values.narrow(2, 0, columns)


class StaticDecoder:
    """One batch's decoding state: the static KV cache and the fixed-shape step (module docstring).

    Args:
        llm: a ``Phi3ForCausalLM``-like causal LM (``llm.model`` returns ``last_hidden_state``), routed.
        attention_mask: [B, T] prompt mask (1 = real token, left padding).
        steps: the most tokens generated per row.
        code_head / text_head: ``(weight, bias)`` of the heads the batch needs (``None`` when no row
            uses it): the ``<idx_*>`` rows of the output embeddings, and the whole output embeddings.
        use_graph: capture the step in a CUDA graph (CUDA only; ``None``: on CUDA devices).
        max_len: the cache's columns (at least ``T + steps``; default exactly that).
        live_columns: attention reads only the columns written so far (a length that changes every step:
            a dynamic dimension of the compiled step); ``None``: without a CUDA graph. ``False`` keeps all
            ``max_len`` columns, the one shape a CUDA graph captures.
        compile: run the step through ``torch.compile`` (module docstring), from the decoder's second step on.

    ``reset`` starts another batch of the same size on the same buffers (and graph).
    """

    def __init__(self, llm, attention_mask: torch.Tensor, steps: int, code_head, text_head, use_graph: bool | None = None,
                 max_len: int | None = None, live_columns: bool | None = None, compile: bool = False):
        self.llm = llm
        self.device = attention_mask.device
        self.batch = attention_mask.shape[0]
        self.max_len = attention_mask.shape[1] + steps if max_len is None else max_len
        self.window = getattr(llm.config, "sliding_window", None)
        self.code_head, self.text_head = code_head, text_head
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        if self.use_graph and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the batch is on {self.device}")
        # a CUDA graph replays one shape: capturing a step per column count would cost a graph per step
        self.live_columns = not self.use_graph if live_columns is None else live_columns
        if self.live_columns and self.use_graph:
            raise ValueError("a CUDA graph captures one shape: live_columns needs use_graph=False")
        self._compiled = None
        if compile:  # one graph: static shapes except the live column count, marked dynamic (``_live``)
            step = types.FunctionType(StaticDecoder.step_fn.__code__.replace(), StaticDecoder.step_fn.__globals__,
                                      "step_fn")  # this decoder's own code object (module docstring)
            self._compiled = torch.compile(types.MethodType(step, self), fullgraph=True)
        self._calls = 0  # steps run over the decoder's life (``reset`` keeps it): the first is eager
        # every decoder layer gets a full-length static layer: a sliding window is applied by the mask
        # a compiled step over live columns gets one spare column, never written nor read: a live count
        # equal to the buffers' length would make its views contiguous, a case the graph specialises on
        held = self.max_len + (compile and self.live_columns)
        self.cache = Cache(layers=[LiveStaticLayer(max_cache_len=held) for _ in range(llm.config.num_hidden_layers)])
        self.columns = torch.arange(held, device=self.device)
        # the step's inputs, static buffers that ``reset`` refills in place (a captured graph reads them)
        self.key_real = torch.ones(self.batch, 1, 1, held, dtype=torch.bool, device=self.device)
        self.positions = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        self.tokens = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        self._graph = None
        self._outputs = None
        self._live_view = None  # the columns attention reads (``_live``)
        self.reset(attention_mask, steps)

    def reset(self, attention_mask: torch.Tensor, steps: int) -> None:
        """Start a batch of prompts [B, T] (B as built, ``T + steps <= max_len``): the cache empties (its
        write counters go to 0; stale columns stay masked until overwritten), masks and positions refill."""
        B, T = attention_mask.shape
        if B != self.batch or T + steps > self.max_len:
            raise ValueError(f"this decoder holds {self.batch} rows of {self.max_len} columns; got {B} rows of "
                             f"{T} + {steps} columns")
        self.prompt_len, self.steps = T, steps
        self.real = attention_mask.bool()
        self.key_real.fill_(True)  # generated columns are real
        self.key_real[:, 0, 0, :T] = self.real
        self.positions.copy_((attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -1:] + 1)  # [B, 1], next position
        for layer in self.cache.layers:
            layer.cumulative_length.zero_()
        self._steps_run = 0

    def _live(self, columns: int) -> None:
        """Attention reads the first ``columns`` cache columns (all of them without ``live_columns``). The
        step and every layer read the count as the length of one view of ``self.columns``; for the
        compiled step that length is a dynamic dimension, so a growing count does not recompile."""
        live = self.columns[:columns] if self.live_columns else None
        if live is not None and self._compiled is not None:
            torch._dynamo.mark_dynamic(live, 0)
        self._live_view = live
        for layer in self.cache.layers:
            layer.live = live

    # ---- the model calls ------------------------------------------------------------------------

    def _heads(self, hidden: torch.Tensor):
        code = None if self.code_head is None else F.linear(hidden, *self.code_head)
        text = None if self.text_head is None else F.linear(hidden, *self.text_head)
        return code, text

    def prefill(self, inputs_embeds: torch.Tensor):
        """Run the prompts [B, T, H] into the cache -> the first step's (code logits, text logits)."""
        positions = (self.real.long().cumsum(-1) - 1).clamp(min=0)
        mask = prefill_mask(self.real, self.columns.shape[0], self.window)
        if self.live_columns:
            mask = mask[..., : self.prompt_len]
        self._live(self.prompt_len)
        out = self.llm.model(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions,
                             cache=self.cache, use_cache=True)
        return self._heads(out.last_hidden_state[:, -1])

    def step_fn(self):
        """The step on the static buffers: feed ``self.tokens`` -> (code logits, text logits). Reads the
        write column from the cache's device counter and advances ``self.positions``; attends over the
        live columns (``_live``: up to the one this step writes) or all of them."""
        current = self.cache.layers[0].cumulative_length  # the column this step writes
        columns = self.columns if self._live_view is None else self._live_view
        visible = columns <= current
        if self.window is not None:
            visible = visible & (columns > current - self.window)
        mask = self.key_real.narrow(-1, 0, columns.shape[0]) & visible
        out = self.llm.model(input_ids=self.tokens, attention_mask=mask, position_ids=self.positions,
                             cache=self.cache, use_cache=True)
        self.positions.add_(1)
        return self._heads(out.last_hidden_state[:, -1])

    def _run(self):
        """One step: eager on the decoder's first call, compiled (if asked) after. The compiled step reads
        the plugin stacks of a mixed batch as the eager step built them (``stacks_as_built``: the
        decoder is keyed on every parameter's version, so none changed since)."""
        self._calls += 1
        if self._compiled is None or self._calls == 1:
            return self.step_fn()
        with stacks_as_built():
            return self._compiled()

    def step(self, tokens: torch.Tensor):
        """Feed the chosen tokens [B] -> the next (code logits, text logits). On CUDA with ``use_graph`` the
        first call runs eagerly on a side stream (warm-up: autotuning, workspaces, routing tensors), with
        ``compile`` the second too, compiled (compilation, inductor's first run), the next captures the
        step, and every later call replays it; the returned tensors are then the graph's static outputs,
        overwritten by the next call."""
        if self._steps_run >= self.steps:
            raise RuntimeError(f"the batch was given {self.steps} steps after a {self.prompt_len}-column prompt; "
                               f"no room for another step")
        self.tokens.copy_(tokens.view(-1, 1))
        self._steps_run += 1
        self._live(self.prompt_len + self._steps_run)
        if not self.use_graph:
            return self._run()
        if self._graph is not None:
            self._graph.replay()
            return self._outputs
        if self._calls < (1 if self._compiled is None else 2):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                outputs = self._run()
            torch.cuda.current_stream(self.device).wait_stream(side)
            return outputs
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):  # records, runs nothing
            self._outputs = self._run()
        self._graph.replay()
        return self._outputs


def _reuse_key(llm, attention_mask, max_len, dtype, code_head, text_head, use_graph, compile) -> tuple:
    """What a kept decoder's buffers and captured step depend on: the batch's shape and kind, the
    attention implementation, the routing (its content: the objects are new per ``set_task``), and
    for every adapted layer its plugins and merged state, for every parameter its storage and
    version (a graph reads weights by address, and a mixed batch's layers read a stacked copy of
    their plugins that an in-place update replaces: ``HLoRALinear._stacked``)."""
    layers = adapter_layers(llm)
    routing = layers[0].routing if layers else None
    routing_key = None if routing is None else (
        routing.active, routing.batch, None if routing.per_sample is None else tuple(routing.per_sample.tolist()))
    if any(layer.routing is not routing for layer in layers):
        routing_key = ("per layer", tuple(id(layer.routing) for layer in layers))  # not shared: never equal twice
    return (
        attention_mask.device, dtype, attention_mask.shape[0], max_len, use_graph, compile, llm.config._attn_implementation,
        None if code_head is None else tuple(t.data_ptr() if t is not None else None for t in code_head),
        None if text_head is None else tuple(t.data_ptr() if t is not None else None for t in text_head),
        routing_key,
        tuple((layer.merged, tuple(layer.plugins)) for layer in layers),
        tuple((p.data_ptr(), p._version) for p in llm.parameters()),
    )


def decoder_for(llm, attention_mask: torch.Tensor, steps: int, code_head, text_head, dtype: torch.dtype,
                use_graph: bool | None = None, compile: bool = False) -> StaticDecoder:
    """A ``StaticDecoder`` for this batch: one the model kept from an earlier batch with the same key
    (``_reuse_key``; its routing objects are put back on the layers, so a captured graph reads live
    tensors), reset for these prompts, or a new one (kept; the oldest of more than
    ``MAX_KEPT_DECODERS`` is dropped). The cache has ``T + steps`` columns rounded up to
    ``LENGTH_BUCKET``."""
    device = attention_mask.device
    use_graph = device.type == "cuda" if use_graph is None else use_graph
    needed = attention_mask.shape[1] + steps
    max_len = -(-needed // LENGTH_BUCKET) * LENGTH_BUCKET
    key = _reuse_key(llm, attention_mask, max_len, dtype, code_head, text_head, use_graph, compile)
    kept = llm.__dict__.setdefault(_KEPT_ATTR, {})
    if key in kept:
        decoder, routing = kept.pop(key)
        kept[key] = (decoder, routing)  # most recently used last
        for layer in adapter_layers(llm):
            layer.set_routing(routing)
        decoder.reset(attention_mask, steps)
        return decoder
    decoder = StaticDecoder(llm, attention_mask, steps, code_head, text_head, use_graph=use_graph, max_len=max_len,
                            compile=compile)
    layers = adapter_layers(llm)
    kept[key] = (decoder, layers[0].routing if layers else None)
    while len(kept) > MAX_KEPT_DECODERS:
        kept.pop(next(iter(kept)))
    return decoder
