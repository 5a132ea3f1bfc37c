"""Per-GPU training memory on paper: HealthGPT-M3 / -L14 stage 3 under DDP, ZeRO-2 and ZeRO-3 / FSDP.

Parameter counts are closed-form from the architectures in ``healthgpt.model.config`` (the test
checks them against the real transformers / hlora / diffusers modules built on the meta device):

    Phi-3 layer     H(H + 2 kv) + H^2 + 2 H I + I H + 2 H      (qkv, o, gate_up, down, 2 RMSNorms; kv = kv_heads x head_dim)
    LLM             L x layer + 2 V H + H                      (embed_tokens and lm_head resized to V, final norm)
    plugin / linear R d_in + d_out R + k d_in                  (A, B, router) on qkv, o, gate_up, down of every layer
    projector       1024 H + H + H^2 + H                       (mlp2x_gelu, one per task)
    CLIP ViT-L/14   (3 p^2 + 1 + (n + 1)) D + 24 x layer + 4 D (patch conv, class, positions, 2 LayerNorms)

Bytes follow the ZeRO paper's mixed-precision accounting (Rajbhandari et al. 2020, K = 12), for
Psi parameters of which Psi_t train, over N GPUs:

    weights      2 Psi                 bf16 (the image tokenizer, frozen, stays float32: 4 bytes)
    gradients    2 Psi_t               bf16, trainable parameters only
    optimizer    12 Psi_t              fp32 master copy + Adam m + Adam v
    DDP          weights + gradients + optimizer, every GPU
    ZeRO-2       weights + (gradients + optimizer) / N
    ZeRO-3/FSDP  (weights + gradients + optimizer) / N + the gathered units in flight: the root unit
                 (what is not in a layer unit: embeddings, lm_head, projectors...) and two layer
                 units (the one computing and the one prefetched), in bf16

Activations (per GPU, independent of N: every GPU runs its own micro-batch of ``tokens`` = 4 x 2048),
bf16, with one checkpoint per decoder layer:

    saved layer inputs     L x tokens x H x 2
    one layer recomputed   tokens x (6 H + 2 kv + 3 I + 4 (2 R + k)) x 2      (norms, q/k/v, attention
                           output, gate_up and its activation, rank-space values and gates of the
                           widest plugin on each of the four adapted linears)
    logits and loss        tokens x V x 12                 (bf16 logits, their fp32 copy, fp32 log-softmax,
                                                            fp32 gradient: what the LLM's loss keeps)

The vision tower is frozen and runs without autograd, so it stores nothing for backward. Not
counted: allocator fragmentation, communication buckets, the CUDA context (about 1 GiB); a card
fits when the total is at most 90 % of its memory. Anchor: the same formula for reference.md's
measured Phi-3-mini PEFT LoRA r=64 run at 4 x 2048 gives 13.8 GiB where 13.3 GiB was measured.
"""

from __future__ import annotations

from dataclasses import dataclass

from healthgpt.constants import TASKS
from healthgpt.model.config import CLIP_VIT_L14_336, MODEL_PRESETS, PHI3_MINI_4K, PHI4

__all__ = ["ParameterCounts", "parameter_counts", "per_gpu_bytes", "memory_table", "STRATEGIES", "GENERATION_VOCAB"]

STRATEGIES = ("ddp", "zero2", "zero3", "fsdp")
GENERATION_VOCAB = 8195  # <start_index>, 8192 <idx_*>, <end_index>, <pixel_newline> (reference.md section 2)
# Base tokenizer lengths the embeddings are resized from: Phi-3-mini's tokenizer holds 32011 tokens
# (-> 40206, reference.md); phi-4's is taken to fill its padded vocabulary of 100352.
BASE_TOKENIZER = {"m3": 32011, "l14": PHI4["vocab_size"]}
LLMS = {"m3": PHI3_MINI_4K, "l14": PHI4}
VQ_PARAMETERS = 68_995_971  # VQGAN OpenImages f=8 8192 as VQTokenizer (the test counts the real module)
BF16, FP32 = 2, 4
OPTIMIZER_BYTES = 12  # fp32 master + Adam m + Adam v
LOGIT_BYTES = 12
CARD_USABLE = 0.9
GIB = 2**30


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of one HealthGPT model by part, and the shapes the activation estimate needs."""

    llm_base: int  # decoder layers' base weights + resized embeddings + lm_head + final norm
    plugins: dict  # task -> parameters of that plugin over all layers
    projectors: dict  # task -> parameters of that projector
    vision: int
    image_tokenizer: int
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int
    layer_unit: int  # one decoder layer with both plugins: the largest sharding unit
    root_unit: int  # what sits in no layer unit: embeddings, lm_head, final norm, projectors, CLIP embeddings

    @property
    def total(self) -> int:
        return self.llm_base + sum(self.plugins.values()) + sum(self.projectors.values()) + self.vision + self.image_tokenizer

    def trainable(self, tasks=TASKS) -> int:
        """Stage 3 trains the plugin and projector of each task in ``tasks``."""
        return sum(self.plugins[t] + self.projectors[t] for t in tasks)


def _plugin_per_layer(rank: int, experts: int, shapes: list) -> int:
    return sum(rank * d_in + d_out * rank + experts * d_in for d_in, d_out in shapes)


def parameter_counts(model: str) -> ParameterCounts:
    """Closed-form counts for ``"m3"`` (Phi-3-mini) or ``"l14"`` (phi-4), both with CLIP ViT-L/14-336."""
    if model not in LLMS:
        raise ValueError(f"model must be one of {sorted(LLMS)}, got {model!r}")
    llm, clip, plugins = LLMS[model], CLIP_VIT_L14_336, MODEL_PRESETS[model]["plugins"]
    H, I, L = llm["hidden_size"], llm["intermediate_size"], llm["num_hidden_layers"]
    kv = llm["num_key_value_heads"] * H // llm["num_attention_heads"]
    V = BASE_TOKENIZER[model] + GENERATION_VOCAB
    linears = [(H, H + 2 * kv), (H, H), (H, 2 * I), (I, H)]  # qkv, o, gate_up, down: (d_in, d_out)
    base_layer = sum(d_in * d_out for d_in, d_out in linears) + 2 * H
    plugin_layer = {t: _plugin_per_layer(plugins[t]["rank"], plugins[t]["num_experts"], linears) for t in TASKS}
    D, Dm, p = clip["hidden_size"], clip["intermediate_size"], clip["patch_size"]
    patches = (clip["image_size"] // p) ** 2
    clip_layer = 4 * (D * D + D) + 2 * 2 * D + (D * Dm + Dm) + (Dm * D + D)
    clip_embed = 3 * p * p * D + D + (patches + 1) * D
    vision = clip_embed + clip["num_hidden_layers"] * clip_layer + 2 * 2 * D
    projector = D * H + H + H * H + H
    embeddings = 2 * V * H + H
    return ParameterCounts(
        llm_base=L * base_layer + embeddings, plugins={t: L * n for t, n in plugin_layer.items()},
        projectors={t: projector for t in TASKS}, vision=vision, image_tokenizer=VQ_PARAMETERS, layers=L, hidden=H,
        intermediate=I, kv_dim=kv, vocab=V, layer_unit=base_layer + sum(plugin_layer.values()),
        root_unit=embeddings + len(TASKS) * projector + clip_embed + 2 * 2 * D,
    )


def activation_bytes(counts: ParameterCounts, tokens: int, plugins: dict) -> int:
    """Activations of one micro-batch of ``tokens`` with per-layer checkpointing (module docstring)."""
    H, I, L, kv, V = counts.hidden, counts.intermediate, counts.layers, counts.kv_dim, counts.vocab
    widest = max(2 * cfg["rank"] + cfg["num_experts"] for cfg in plugins.values())
    saved = L * tokens * H * BF16
    layer = tokens * (6 * H + 2 * kv + 3 * I + 4 * widest) * BF16
    logits = tokens * V * LOGIT_BYTES
    return saved + layer + logits


def per_gpu_bytes(model: str = "m3", strategy: str = "ddp", n_gpus: int = 1, tasks=TASKS,
                  tokens: int = 4 * 2048) -> dict:
    """Per-GPU bytes of stage 3 (``tasks``: the plugins + projectors that train) under ``strategy``
    (``ddp``, ``zero2``, ``zero3`` or ``fsdp``, the last two alike) on ``n_gpus`` GPUs ->
    ``{"weights", "gradients", "optimizer", "gathered", "activations", "total"}``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if int(n_gpus) != n_gpus or n_gpus < 1:
        raise ValueError(f"n_gpus must be a positive integer, got {n_gpus!r}")
    counts = parameter_counts(model)
    trainable = counts.trainable(tuple(tasks))
    weights = (counts.total - counts.image_tokenizer) * BF16 + counts.image_tokenizer * FP32
    grads, optim = trainable * BF16, trainable * OPTIMIZER_BYTES
    gathered = 0
    if strategy in ("zero2", "zero3", "fsdp"):
        grads, optim = grads / n_gpus, optim / n_gpus
    if strategy in ("zero3", "fsdp"):
        weights = weights / n_gpus
        gathered = (counts.root_unit + 2 * counts.layer_unit) * BF16 if n_gpus > 1 else 0
    acts = activation_bytes(counts, tokens, MODEL_PRESETS[model]["plugins"])
    out = {"weights": weights, "gradients": grads, "optimizer": optim, "gathered": gathered, "activations": acts}
    out["total"] = sum(out.values())
    return out


def fits(total_bytes: float, card_gib: float = 80) -> bool:
    """True when ``total_bytes`` is at most 90 % of a card of ``card_gib`` GiB (an "80 GB" A100/H100 has 80 GiB)."""
    return total_bytes <= CARD_USABLE * card_gib * GIB


def memory_table(models=("m3", "l14"), strategies=("ddp", "zero2", "zero3"), gpus=(1, 2, 8), card_gib: float = 80) -> str:
    """The Markdown table of ``configs/README.md``: GiB per GPU of stage 3 mixed and whether it fits."""
    rows = [f"| model | strategy | N | weights | grads | Adam | gathered | activations | total GiB | fits {card_gib:g} GB |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for model in models:
        for strategy in strategies:
            for n in gpus:
                b = per_gpu_bytes(model, strategy, n)
                cells = [f"{b[k] / GIB:.1f}" for k in ("weights", "gradients", "optimizer", "gathered", "activations", "total")]
                name = "ZeRO-3 / FSDP" if strategy == "zero3" else {"ddp": "DDP", "zero2": "ZeRO-2", "fsdp": "FSDP"}[strategy]
                rows.append(f"| {model.upper()} | {name} | {n} | " + " | ".join(cells) + f" | {'yes' if fits(b['total'], card_gib) else 'no'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(memory_table())
