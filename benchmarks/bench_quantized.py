"""H-LoRA vs PEFT LoRA on the same 4-bit base (QLoRA): fwd+bwd time and memory, side by side.

    python benchmarks/bench_quantized.py                 # CPU (bitsandbytes' CPU backend)
    python benchmarks/bench_quantized.py --device cuda --hidden 3072 --inter 8192 --seq 2048

One random Llama-architecture model is saved once and loaded three times through transformers'
``BitsAndBytesConfig`` (nf4, double quantization, compute dtype bf16 on CUDA / fp32 on a CPU):
the frozen base alone (the input embeddings require grad so the backward runs through every
layer), PEFT LoRA of rank R on every linear but lm_head (``peft.get_peft_model``), and hlora with one
plugin of the same total rank R in k experts on the same layers (``target_modules="all-linear"``).
Every adapter has random non-zero B, dropout 0, training mode.

Time: the median of ``--reps`` fwd+bwd steps after one warm-up; on a CPU in CPU seconds of this
process (``time.process_time``: robust when other work shares the machine; run with one thread
for the same reason), on CUDA in wall seconds after synchronising. Memory: the bytes autograd
saves for the backward in one step (unique storages, counted by ``saved_tensors_hooks``), the
adapter's parameter bytes, and on CUDA the peak allocated. Ratios: to the base and hlora / PEFT.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import hlora


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--inter", type=int, default=1536)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=64, help="total rank R of both adapters")
    p.add_argument("--experts", type=int, default=4, help="hlora experts k (R/k each)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: see the docstring)")
    p.add_argument("--json", help="also write the rows to this file")
    return p.parse_args(argv)


def build(args, directory: str, provider: str):
    compute = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
    model = LlamaForCausalLM.from_pretrained(directory, quantization_config=quant, device_map=args.device, dtype=compute)
    for p in model.parameters():
        p.requires_grad_(False)
    if provider == "peft_lora":
        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                 target_modules="all-linear", init_lora_weights=False))
    elif provider == "hlora":
        plugin = hlora.PluginConfig(args.rank, args.experts, 2 * args.rank // args.experts)
        hlora.inject(model, hlora.HLoRAConfig(plugins={"task": plugin}, target_modules="all-linear"))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in hlora.adapter_layers(model):
                B = layer.plugins["task"].B
                B.copy_(torch.randn(B.shape, generator=g).to(B.device) / B.shape[1] ** 0.5)
    model.get_input_embeddings().weight.requires_grad_(provider == "base")  # the base needs something to train
    return model.train()


def adapter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if p.requires_grad and "embed" not in n)


def step(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    model.zero_grad(set_to_none=True)


def saved_bytes(model, ids) -> int:
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), t.device)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def measure(args, model, ids) -> dict:
    cuda = args.device.startswith("cuda")
    step(model, ids)  # warm-up
    times = []
    for _ in range(args.reps):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter() if cuda else time.process_time()
        step(model, ids)
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() if cuda else time.process_time()) - start)
    row = {"ms": 1e3 * statistics.median(times), "saved_mb": saved_bytes(model, ids) / 2**20,
           "adapter_mb": adapter_bytes(model) / 2**20}
    if cuda:
        row["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.inter,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=max(args.seq, 128))
    ids = torch.randint(0, 1024, (args.batch, args.seq), device=args.device)
    rows = {}
    with tempfile.TemporaryDirectory() as directory:
        LlamaForCausalLM(config).save_pretrained(directory)
        for provider in ("base", "peft_lora", "hlora"):
            model = build(args, directory, provider)
            rows[provider] = measure(args, model, ids)
            del model
    base, peft = rows["base"], rows["peft_lora"]
    print(f"# {args.layers} layers, hidden {args.hidden}, inter {args.inter}, T = {args.batch}x{args.seq}, "
          f"R = {args.rank} (hlora k = {args.experts}), nf4 double quant, {args.device}")
    cols = ["ms", "saved_mb", "adapter_mb"] + (["peak_mb"] if "peak_mb" in base else [])
    print("| provider | " + " | ".join(cols) + " | time / base | time / PEFT | saved / PEFT |")
    print("|---" * (len(cols) + 4) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.2f}" for c in cols)
              + f" | {r['ms'] / base['ms']:.3f} | {r['ms'] / peft['ms']:.3f} | {r['saved_mb'] / peft['saved_mb']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
