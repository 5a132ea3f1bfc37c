"""Whole-model training throughput: PEFT LoRA vs hlora MoELoRA vs hlora H-LoRA (one step at a time).

    python benchmarks/train_step.py --out bench-out            # GPU: Phi-3-mini shape, bf16, 4 x 2048
    python benchmarks/train_step.py --cpu-smoke --out /tmp/x   # CPU: tiny shapes, checks it all runs

A Phi-3-mini-shaped model (random weights, SDPA, gradient checkpointing) is built once; each provider
patches it, trains ``--steps`` AdamW steps after ``--warmup`` and is removed again. Reported per
provider: tokens/s, TFLOP/s counted as 6 x params x tokens (the convention of reference.md section 7),
peak memory. Writes ``train_step.csv`` (kernel, provider, mode, x, median, p20, p80, gpu, version rows
plus throughput columns), ``train_step.md`` and ``k_sweep.png``. Last, ``healthgpt-stage3``: the full
HealthGPT-M3 stage-3 comprehension step (vision tower, projector, comp plugin) at the same batch shape.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

import hlora

PROJECTIONS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


@dataclass
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    batch: int
    seq: int
    dtype: torch.dtype


GPU_SHAPE = Shape(3072, 8192, 32, 32, 32064, 4, 2048, torch.bfloat16)  # Phi-3-mini, reference.md section 7
CPU_SHAPE = Shape(64, 128, 2, 4, 128, 2, 32, torch.float32)


def build_base(shape: Shape, device: str):
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        max_position_embeddings=max(4096, shape.seq), pad_token_id=0, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Phi3ForCausalLM._from_config(cfg, dtype=shape.dtype)
    model.config.use_cache = False
    model.requires_grad_(False)
    return model


# ---- providers: each patches the base model and returns (model to train, undo) ----------------


def peft_lora(base, rank):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=PROJECTIONS, lora_dropout=0.0))
    return model, model.unload


def hlora_provider(variant, plugins, tasks):
    def make(base, batch):
        config = hlora.HLoRAConfig(plugins=plugins, target_modules=PROJECTIONS, variant=variant)
        hlora.inject(base, config)
        hlora.set_task(base, tasks(batch) if callable(tasks) else tasks)
        return base, lambda: hlora.unload(base)
    return make


def healthgpt_stage3(preset: str, device: str, shape: Shape):
    """The full HealthGPT stage-3 comprehension step: CLIP tower + projector + Phi-3 with the comp
    plugin training (plugin + projector), on image + question/answer samples of ``shape.seq`` tokens."""
    import numpy as np
    from PIL import Image

    from healthgpt import HealthGPT, HealthGPTConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = HealthGPT(HealthGPTConfig.preset(preset))
    model.set_trainable(plugins=("comp",), projectors=("comp",))
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8))
    seq = max(shape.seq, model.num_image_tokens + 96)  # the tiny preset's image alone may exceed --cpu-smoke's seq
    words = " ".join(["finding"] * ((seq - model.num_image_tokens - 64) // 2))
    conv = [{"from": "human", "value": "<image>\nDescribe: " + words}, {"from": "gpt", "value": words}]
    batch = model.collate([model.prepare_sample(conv, "comp", image=image, max_length=seq) for _ in range(shape.batch)])
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    inputs["images"] = inputs["images"].to(model.dtype)
    return model, inputs


def providers(sweep: bool):
    comp = hlora.PluginConfig(rank=64, num_experts=4, alpha=128)
    gen = hlora.PluginConfig(rank=256, num_experts=4, alpha=512)
    out = {
        ("peft-lora", 64): lambda base, b: peft_lora(base, 64),
        ("hlora-moelora", 64): hlora_provider("moelora", {"comp": comp}, "comp"),
        ("hlora-comp", 64): hlora_provider("hlora", {"comp": comp}, "comp"),
        ("hlora-gen", 256): hlora_provider("hlora", {"gen": gen}, "gen"),
        ("hlora-mixed", 64): hlora_provider("hlora", {"comp": comp, "gen": gen}, lambda b: ["comp", "gen"] * (b // 2) + ["comp"] * (b % 2)),
    }
    if sweep:
        for k in (2, 4, 8, 32):
            plug = {"t": hlora.PluginConfig(rank=16 * k, num_experts=k, alpha=32)}
            out[(f"sweep-hlora-k{k}", 16 * k)] = hlora_provider("hlora", plug, "t")
            out[(f"sweep-moelora-k{k}", 16 * k)] = hlora_provider("moelora", plug, "t")
    return out


# ---- measurement --------------------------------------------------------------------------------


def token_batch(shape: Shape, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, shape.vocab, (shape.batch, shape.seq), generator=g).to(device)
    return {"input_ids": ids, "labels": ids}


def measure(model, inputs: dict, device: str, steps: int, warmup: int):
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    model.gradient_checkpointing_disable()
    del opt
    return times, peak, losses


def quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks, no timings worth reading")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--only", nargs="*", help="provider names to run")
    args = ap.parse_args(argv)

    if args.cpu_smoke:
        shape, device = CPU_SHAPE, "cpu"
        steps, warmup = args.steps or 2, args.warmup or 1
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --cpu-smoke on a CPU", file=sys.stderr)
            return 2
        shape, device = GPU_SHAPE, "cuda"
        steps, warmup = args.steps or 5, args.warmup or 2
    os.makedirs(args.out, exist_ok=True)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    version = f"torch {torch.__version__}, hlora {hlora.__version__}"

    base = build_base(shape, device)
    n_params = sum(p.numel() for p in base.parameters())
    rows = []

    def record(name, rank, model, inputs, params):
        times, peak, losses = measure(model, inputs, device, steps, warmup)
        if device == "cuda":
            torch.cuda.empty_cache()
        if not all(torch.isfinite(torch.tensor(losses))):
            raise RuntimeError(f"{name}: non-finite loss {losses}")
        tokens = int(inputs["input_ids"].numel())
        med = statistics.median(times)
        row = dict(kernel="train_step", provider=name, mode="fwd+bwd+adamw", x=rank,
                   median=med * 1e3, p20=quantile(times, 0.2) * 1e3, p80=quantile(times, 0.8) * 1e3, gpu=gpu, version=version,
                   tokens_per_s=tokens / med, tflops=6 * params * tokens / med / 1e12, peak_gib=peak)
        rows.append(row)
        print(f"{name:>20}  R={rank:<4} {row['tokens_per_s']:>10.0f} tok/s  {row['tflops']:7.1f} TFLOP/s  "
              f"peak {peak:6.1f} GiB  loss {losses[-1]:.3f}", flush=True)

    for (name, rank), make in providers(sweep=not args.no_sweep).items():
        if args.only and name not in args.only:
            continue
        model, undo = make(base, shape.batch)
        record(name, rank, model, token_batch(shape, device), n_params)
        undo()
    del base
    if not args.only or "healthgpt-stage3" in args.only:
        model, inputs = healthgpt_stage3("tiny" if args.cpu_smoke else "m3", device, shape)
        record("healthgpt-stage3", 64, model, inputs, sum(p.numel() for p in model.parameters()))

    with open(os.path.join(args.out, "train_step.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    write_table(rows, os.path.join(args.out, "train_step.md"), gpu, version, n_params, shape)
    plot_sweep(rows, os.path.join(args.out, "k_sweep.png"), gpu)
    return 0


def write_table(rows, path, gpu, version, n_params, shape):
    ref = next((r for r in rows if r["provider"] == "peft-lora"), None)
    # healthgpt-stage3 counts all of its parameters (CLIP tower included) in TFLOP/s
    lines = [f"{gpu}; {version}; {n_params / 1e9:.2f}B params, batch {shape.batch} x {shape.seq}, {shape.dtype}", "",
             "| provider | R | tokens/s | vs PEFT LoRA | TFLOP/s | peak GiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        lines.append(f"| {r['provider']} | {r['x']} | {r['tokens_per_s']:.0f} | {rel} | {r['tflops']:.1f} | {r['peak_gib']:.1f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot_sweep(rows, path, gpu):
    if not any(r["provider"].startswith("sweep-") for r in rows):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for family in ("hlora", "moelora"):
        pts = [(int(r["provider"].rsplit("k", 1)[1]), r["median"]) for r in rows if r["provider"].startswith(f"sweep-{family}-k")]
        if pts:
            ks, ms = zip(*sorted(pts))
            ax.plot(ks, [m / ms[0] for m in ms], marker="o", label=family)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("experts k (r = 16 each)")
    ax.set_ylabel("step time / time at k = 2")
    ax.set_title(f"Expert sweep, {gpu}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
