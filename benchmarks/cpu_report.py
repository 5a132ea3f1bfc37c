"""Turn a pytest-benchmark JSON of bench_cpu_layers.py into ratio rows (median time / LoRA's)."""

import json
import platform
import sys
from collections import defaultdict

import torch


def main(path: str) -> None:
    data = json.load(open(path))
    med = defaultdict(dict)
    for b in data["benchmarks"]:
        med[b["extra_info"]["k"]][b["extra_info"]["provider"]] = b["stats"]["median"]
    providers = ["hlora", "hlora-peaked", "moelora"]
    print(f"CPU: {data['machine_info'].get('cpu', {}).get('brand_raw', platform.processor())}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of 12 rounds, fwd+bwd, fp32")
    print()
    print("| k | R total | LoRA (ms) | " + " | ".join(f"{p} / LoRA" for p in providers) + " |")
    print("|---|---|---|" + "---|" * len(providers))
    for k in sorted(med):
        row = med[k]
        print(f"| {k} | {16 * k} | {row['lora'] * 1e3:.1f} | " + " | ".join(f"{row[p] / row['lora']:.2f}" for p in providers) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
