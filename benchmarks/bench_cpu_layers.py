"""CPU fwd+bwd of one adapted layer: H-LoRA vs plain LoRA (same total rank) vs the MoELoRA loop.

    pytest benchmarks/bench_cpu_layers.py --benchmark-json=bench.json
    python benchmarks/cpu_report.py bench.json        # ratios to LoRA, as in RESULTS.md

Shapes follow reference.md section 8: T=2048 tokens, d=1024, r=16 per expert, fp32, scaled random
weights; ``peaked`` multiplies the router by 50 so most gate weights would be subnormal.
"""

import pytest
import torch

import hlora
from hlora.layer import LAYER_CLASSES

T, D, R_PER_EXPERT = 2048, 1024, 16
EXPERTS = [2, 4, 8, 32]


def make_layer(variant, k, peaked=False):
    torch.manual_seed(0)
    base = torch.nn.Linear(D, D)
    base.requires_grad_(False)
    cfg = hlora.PluginConfig(rank=R_PER_EXPERT * k, num_experts=1 if variant == "lora" else k, alpha=2 * R_PER_EXPERT)
    layer = LAYER_CLASSES[variant](base, {"t": cfg}, ["t"])
    with torch.no_grad():
        for name, p in layer.plugins["t"].named_parameters():
            if name.endswith("B"):
                p.normal_(std=0.02)
            if name == "router" and peaked:
                p.mul_(50.0)
    layer.set_routing(0)
    return layer.train()


def fwd_bwd(layer, x, dy):
    y = layer(x)
    y.backward(dy)
    return y


@pytest.mark.parametrize("k", EXPERTS)
@pytest.mark.parametrize("provider", ["lora", "hlora", "hlora-peaked", "moelora"])
def test_layer_fwd_bwd(benchmark, provider, k, monkeypatch):
    monkeypatch.setenv("HLORA_BACKEND", "torch")
    variant, _, peaked = provider.partition("-")
    layer = make_layer(variant, k, peaked=bool(peaked))
    x = torch.randn(T, D, requires_grad=True)
    dy = torch.randn(T, D)
    benchmark.group = f"k={k}"
    benchmark.extra_info.update(provider=provider, k=k, T=T, d=D, rank=R_PER_EXPERT * k)
    y = benchmark.pedantic(fwd_bwd, args=(layer, x, dy), rounds=12, warmup_rounds=2)
    assert torch.isfinite(y).all()
