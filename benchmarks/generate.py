"""Decoding throughput: HealthGPT's static decode path against transformers ``generate()`` on the same
base wrapped by PEFT LoRA of the same total rank, and against the MoELoRA loop, side by side in one run.

Providers (every one greedy, on the same random Phi-3-shaped base with both plugins resident):

- ``hlora_static``: ``healthgpt.model.generation.decode`` (static cache; a CUDA graph on CUDA), H-LoRA.
- ``hlora_compiled`` (with ``--compile``): the same with the step through ``torch.compile`` (inductor; on
  CUDA inside the CUDA graph). Its first call per batch compiles: that call's wall-clock is reported
  apart (``compile_s``), and its timed rounds reuse the compiled step (tokens/s without compilation).
  Its tokens must equal ``hlora_eager``'s too.
- ``hlora_eager``: ``decode_eager`` (DynamicCache, host bookkeeping per step), H-LoRA: the reference;
  ``hlora_static``'s tokens must equal it (asserted).
- ``hlora_generate``: transformers ``generate()`` on the H-LoRA model (what the decoder alone gains).
- ``peft_lora``: transformers ``generate()`` on the base wrapped by ``peft`` LoRA, r = the plugin's total
  rank R, all linear layers, non-zero B.
- ``moelora_loop``: transformers ``generate()`` on the model with ``variant="moelora"`` (k experts
  computed one by one).

CPU (default): a Phi-3-shaped model at hidden 512 (intermediate 1368, 4 layers, 8 heads), fp32, 256
new tokens, batch 1 and 8, routed to ``gen`` (``comp`` resident). Two shapes (``--shape``):

- ``proportional`` (default): what a step of M3 reads, in the same proportions: M3's plugin ranks scaled
  with the width (gen R=48, comp R=16, k=4: the adapter is ~12% of the base's bytes, as M3's R=256 is
  at hidden 3072) and a 1024-token vocabulary (the head ~4% of the base, as Phi-3's is in M3).
- ``phi3-vocab``: M3's ranks (gen R=256, comp R=64) and Phi-3's vocabulary at hidden 512: the head is
  half of what a step reads and the adapter 2/3 of the base, which no HealthGPT decode resembles; kept
  for comparison with the first measurements.

Tokens/s is new tokens x batch / CPU seconds of the process (``--threads 1`` by default: on a shared
machine wall-clock mostly measures the other jobs), the best of ``--repeats`` interleaved rounds. Also
printed: the bytes a step reads (base, head, routed adapter) and, per provider, the aten ops a decode
step runs and what one op costs here, which together say what a step's time is made of.

``--gpu``: M3 shapes (Phi-3-mini, bf16, random weights), 1024 image codes + ``<end_index>`` per image
(``hlora_static`` constrained to the code range; the baselines decode 1025 unconstrained tokens: the
same work per step), batch 1 and 8, seconds per image and the fraction of the bandwidth bound (the
bytes a step reads at least, once: base, code head, routed adapter).

    python benchmarks/generate.py [--shape proportional|phi3-vocab] [--compile] [--threads 1] [--repeats 2] [--json out.json]
    python benchmarks/generate.py --gpu [--compile] [--bandwidth-gbs 4200] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import platform
import time
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile

import hlora
from healthgpt.model.config import PHI3_MINI_4K
from healthgpt.model.generation import decode, decode_eager

PROVIDERS = ("hlora_static", "hlora_eager", "hlora_generate", "peft_lora", "moelora_loop")
COMPILED = "hlora_compiled"
OURS = ("hlora_static", COMPILED)  # the rows the table gives ratios for
NUM_CODES = 8192  # VQGAN OpenImages f=8 codebook


def plugins(comp_rank: int = 64, gen_rank: int = 256, experts: int = 4, scale: float = 8.0) -> dict:
    """Both plugins (M3's ranks by default), ``alpha = scale * rank / experts``."""
    return {
        "comp": dict(rank=comp_rank, num_experts=experts, alpha=scale * comp_rank / experts),
        "gen": dict(rank=gen_rank, num_experts=experts, alpha=scale * gen_rank / experts),
    }


# --shape -> (text vocabulary, image codes, plugins); the layers are Phi-3-mini's proportions at hidden 512
CPU_SHAPES = {
    "proportional": (768, 253, dict(comp_rank=16, gen_rank=48)),
    "phi3-vocab": (PHI3_MINI_4K["vocab_size"], NUM_CODES, dict(comp_rank=64, gen_rank=256)),
}


def cpu_config(shape: str = "proportional") -> dict:
    """Phi-3-mini's proportions (intermediate / hidden = 8/3, head dim 64 here) at hidden 512, 4 layers;
    the vocabulary (text + codes + 3 generation tokens) of ``CPU_SHAPES[shape]``."""
    text, codes, _ = CPU_SHAPES[shape]
    return dict(PHI3_MINI_4K, hidden_size=512, intermediate_size=1368, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=8, vocab_size=text + codes + 3, sliding_window=None, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)


def gpu_config() -> dict:
    return dict(PHI3_MINI_4K, vocab_size=PHI3_MINI_4K["vocab_size"] + NUM_CODES + 3)


def vocab_for(config: dict, num_codes: int = NUM_CODES) -> SimpleNamespace:
    """Generation ids as ``GenerationVocab`` lays them out: start, the codes, end, newline (the last ids)."""
    start = config["vocab_size"] - num_codes - 3
    return SimpleNamespace(start=start, code0=start + 1, num_codes=num_codes, end=start + 1 + num_codes)


def _randomise_adapters(model: torch.nn.Module, seed: int) -> None:
    """Non-zero B (and LoRA B) so the adapters change the output, scaled like trained ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".B", ".lora_B.default.weight")):  # H-LoRA / MoELoRA experts' B, PEFT's lora_B
                p.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p.device, p.dtype))


def build(config: dict, dtype: torch.dtype, device: str, plugin_ranks: dict, seed: int = 0,
          variants=("hlora", "moelora")) -> dict:
    """The base, and per provider a model on it (each provider owns a copy: inject replaces modules)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):  # random init where the model runs (M3 on a CPU takes minutes)
        base = Phi3ForCausalLM._from_config(Phi3Config(**config), attn_implementation="sdpa", dtype=dtype).eval()
    models = {}
    for variant in variants:
        m = hlora.inject(copy.deepcopy(base), hlora.HLoRAConfig(plugins=plugins(**plugin_ranks), target_modules="all-linear",
                                                                  variant=variant))
        _randomise_adapters(m, seed + 1)
        hlora.set_task(m, "gen")
        models[variant] = m.to(device).eval()
    gen = plugins(**plugin_ranks)["gen"]
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=gen["rank"], lora_alpha=gen["alpha"], target_modules="all-linear"))
    _randomise_adapters(peft, seed + 1)
    models["peft"] = peft.to(device).eval()
    return models


def prompts(batch: int, length: int, vocab_size: int, device: str, seed: int = 0):
    """Random prompt ids, left-padded to ``length`` with rows of different lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(32000, vocab_size), (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for b in range(batch):
        mask[b, : (b * 3) % (length // 2)] = 0
    return ids.masked_fill(mask == 0, 0).to(device), mask.to(device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def run_provider(name: str, models: dict, ids, mask, new_tokens: int, image: bool, vocab) -> tuple:
    """-> (seconds, tokens [B, new_tokens] as lists). Seconds: wall-clock on CUDA; on a CPU the process's
    CPU time (one intra-op thread by default), which other jobs on a shared machine inflate far less."""
    device = ids.device.type
    B = ids.shape[0]
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    if name in ("hlora_static", "hlora_eager", COMPILED):
        llm = models["hlora"]
        fn = decode_eager if name == "hlora_eager" else functools.partial(decode, compile=name == COMPILED)
        embeds = llm.get_input_embeddings()(ids)
        n = new_tokens - 1 if image else 0
        out = fn(llm, embeds, mask, [image] * B, n, vocab, set(), 0, new_tokens)
    else:
        model = models[{"hlora_generate": "hlora", "peft_lora": "peft", "moelora_loop": "moelora"}[name]]
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
        out = gen[:, ids.shape[1]:].tolist()
    _sync(device)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return (wall if device == "cuda" else cpu), out


def bench(models: dict, batches, new_tokens: int, prompt_len: int, repeats: int, image: bool, vocab, device: str,
          providers=PROVIDERS) -> list:
    rows = []
    for B in batches:
        ids, mask = prompts(B, prompt_len, vocab.start, device)
        best, outputs, compile_s = {}, {}, {}
        # warm-up (first calls, lazy initialisation; on CUDA the kernels' compilation and tuning); on CUDA the
        # static decoder is then kept with its captured graph, as a user's second image finds it. The compiled
        # step's warm-up is its compilation, at the timed length (the decoder, kept, is keyed on it)
        for name in providers:
            full = name == COMPILED or (name == "hlora_static" and device == "cuda")
            start = time.perf_counter()
            run_provider(name, models, ids, mask, new_tokens if full else 8, image, vocab)
            if name == COMPILED:
                compile_s[name] = time.perf_counter() - start
        for _ in range(repeats):  # interleaved rounds: a load spike hits every provider alike
            for name in providers:
                seconds, out = run_provider(name, models, ids, mask, new_tokens, image, vocab)
                best[name] = min(best.get(name, float("inf")), seconds)
                outputs[name] = out
        for ours in [o for o in OURS if o in outputs and "hlora_eager" in outputs]:
            if device == "cuda":  # bf16 near-ties may flip: reported, not asserted
                pairs = [(a, b) for ra, rb in zip(outputs[ours], outputs["hlora_eager"]) for a, b in zip(ra, rb)]
                print(f"batch {B}: {ours} and eager tokens agree at {sum(a == b for a, b in pairs)}/{len(pairs)} positions")
            else:
                assert outputs[ours] == outputs["hlora_eager"], f"{ours} decode differs from the eager path"
        if "hlora_generate" in outputs and not image:
            same = outputs["hlora_static"] == outputs["hlora_generate"]
            print(f"batch {B}: static tokens {'equal' if same else 'DIFFER from'} transformers generate() on the same model")
        for name in providers:
            rows.append(dict(batch=B, provider=name, seconds=best[name], tokens_per_s=B * new_tokens / best[name],
                             s_per_image=best[name] / B if image else None, compile_s=compile_s.get(name)))
    return rows


def step_bytes(model: torch.nn.Module, vocab, image: bool, task: str = "gen") -> dict:
    """The bytes one decode step of the H-LoRA ``model`` reads at least, each once, by part: ``base`` (the
    decoder layers' frozen weights and norms), ``head`` (the rows scored: the codes for an image, else
    all), ``adapter`` (the routed plugin's A, B and router; the other plugin is resident, unread).
    The input embeddings (one row per token) are left out."""
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    parts = dict(base=0, head=(vocab.num_codes if image else head.shape[0]) * head.shape[1] * head.element_size(), adapter=0)
    for name, p in model.named_parameters():
        if p is emb or p is head:
            continue
        if ".plugins." in name:
            parts["adapter"] += p.numel() * p.element_size() if f".plugins.{task}." in name else 0
        else:
            parts["base"] += p.numel() * p.element_size()
    return parts


def aten_calls_per_step(name: str, models: dict, ids, mask, vocab) -> float:
    """aten operator calls (nested ones included: each passes the dispatcher) per decode step of
    provider ``name``: the difference of two profiled runs (24 and 8 new tokens) / 16, after an unprofiled
    one (a compiled step compiles on its decoder's first call)."""
    run_provider(name, models, ids, mask, 24, False, vocab)
    counts = []
    for n in (8, 24):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_provider(name, models, ids, mask, n, False, vocab)
        counts.append(sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")))
    return (counts[1] - counts[0]) / 16


def us_per_aten_call(reps: int = 20000) -> float:
    """What one small aten call (an add of two 1-element tensors) costs here, microseconds, best of 5."""
    a = torch.ones(1)
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(reps):
            torch.add(a, a)
        best = min(best, (time.process_time() - start) / reps * 1e6)
    return best


def step_anatomy(rows: list, models: dict, vocab, prompt_len: int, new_tokens: int) -> list:
    """Per provider at batch 1: ms per step, aten calls per step, and the share of the step that the
    calls' fixed cost alone would take (calls x ``us_per_aten_call``)."""
    ids, mask = prompts(1, prompt_len, vocab.start, "cpu")
    per_call = us_per_aten_call()
    out = []
    for r in rows:
        if r["batch"] != 1:
            continue
        calls = aten_calls_per_step(r["provider"], models, ids, mask, vocab)
        ms = r["seconds"] / new_tokens * 1e3
        out.append(dict(provider=r["provider"], ms_per_step=ms, aten_calls=calls, dispatch_ms=calls * per_call / 1e3,
                        us_per_call=per_call))
    return out


def table(rows: list, baseline_names=("peft_lora", "moelora_loop"), image: bool = False) -> str:
    present = {r["provider"] for r in rows}
    baseline_names = [b for b in baseline_names if b in present]
    compiled = any(r.get("compile_s") is not None for r in rows)
    lines = ["| batch | provider | s | tokens/s | " + ("s/image | " if image else "") + ("compile s | " if compiled else "")
             + " | ".join(f"{b} s / ours s" for b in baseline_names) + " |"]
    lines.append("|" + "---|" * (4 + image + compiled + len(baseline_names)))
    by = {(r["batch"], r["provider"]): r for r in rows}
    for r in rows:
        ratios = [by[(r["batch"], b)]["seconds"] / r["seconds"] if r["provider"] in OURS else None for b in baseline_names]
        cells = [str(r["batch"]), r["provider"], f"{r['seconds']:.3f}", f"{r['tokens_per_s']:.1f}"]
        if compiled:
            cells.append("" if r.get("compile_s") is None else f"{r['compile_s']:.1f}")
        if image:
            cells.append(f"{r['s_per_image']:.3f}")
        cells += [f"{x:.2f}x" if x else "" for x in ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="M3 shapes on CUDA, 1024 image codes per image")
    parser.add_argument("--shape", choices=sorted(CPU_SHAPES), default="proportional", help="CPU model (module docstring)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=None, help="CPU: 256; GPU: 1025 (1024 codes + end)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--bandwidth-gbs", type=float, default=4200.0, help="HBM bandwidth for the bound (H200: 4200 measured)")
    parser.add_argument("--compile", action="store_true",
                        help=f"add {COMPILED}: the static step through torch.compile (compile time reported apart)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA device")
        device, dtype, config, image = "cuda", torch.bfloat16, gpu_config(), True
        new_tokens, prompt_len = args.new_tokens or 1025, 64
        vocab, ranks, variants = vocab_for(config), {}, ("hlora",)
    else:
        torch.set_num_threads(args.threads)
        device, dtype, config, image = "cpu", torch.float32, cpu_config(args.shape), False
        new_tokens, prompt_len = args.new_tokens or 256, 32
        _, codes, ranks = CPU_SHAPES[args.shape]
        vocab, variants = vocab_for(config, codes), ("hlora", "moelora")
    models = build(config, dtype, device, ranks, variants=variants)
    parts = step_bytes(models["hlora"], vocab, image)
    total = sum(parts.values())
    print("a step reads at least " + ", ".join(f"{k} {v / 1e6:.1f} MB ({v / total:.0%})" for k, v in parts.items())
          + f" = {total / 1e6:.1f} MB")
    if args.gpu:  # the eager reference and the MoE loop take minutes at 1025 tokens: a short equality check only
        bench(models, [2], 24, prompt_len, 1, image, vocab, device,
              providers=("hlora_static", "hlora_eager") + ((COMPILED,) if args.compile else ()))
        providers = ("hlora_static", "peft_lora")
    else:
        providers = PROVIDERS
    if args.compile:
        providers = (providers[0], COMPILED) + providers[1:]
    rows = bench(models, args.batches, new_tokens, prompt_len, args.repeats, image, vocab, device, providers)
    print(table(rows, image=image))
    result = dict(device=torch.cuda.get_device_name() if args.gpu else platform.processor() or platform.machine(),
                  torch=torch.__version__, threads=None if args.gpu else args.threads, new_tokens=new_tokens,
                  shape=None if args.gpu else args.shape, step_bytes=parts,
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), rows=rows)
    if not args.gpu and 1 in args.batches:
        result["anatomy"] = step_anatomy(rows, models, vocab, prompt_len, new_tokens)
        print(f"batch 1, per step (one aten call costs {result['anatomy'][0]['us_per_call']:.1f} us here; "
              f"the step reads {total / 1e6:.1f} MB):")
        for a in result["anatomy"]:
            print(f"  {a['provider']:15s} {a['ms_per_step']:6.2f} ms, {a['aten_calls']:5.0f} aten calls "
                  f"= {a['dispatch_ms']:5.2f} ms of fixed call cost, {a['ms_per_step'] - a['dispatch_ms']:6.2f} ms the rest")
    if args.gpu:
        bound = total / (args.bandwidth_gbs * 1e9)
        for r in rows:
            r["fraction_of_bound"] = bound * new_tokens / r["seconds"]
        print(f"bandwidth bound: {total / 1e9:.2f} GB per step / {args.bandwidth_gbs:.0f} GB/s = {bound * 1e3:.2f} ms/token, "
              f"{bound * new_tokens:.2f} s per batch of images")
        for r in rows:
            print(f"batch {r['batch']} {r['provider']}: {r['s_per_image']:.2f} s/image, {r['fraction_of_bound']:.2f} of the bound")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
