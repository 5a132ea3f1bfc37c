"""``healthgpt demo``: the whole pipeline on a laptop CPU in a couple of minutes, nothing downloaded.

1. builds the bundled sample set from real medical images inside installed wheels (pydicom,
   nibabel, scikit-image; ``healthgpt.data.samples``),
2. builds the ``tiny`` HealthGPT preset (random weights) and trains stage 1 -> 2 -> 3 on it with
   the Trainer (each stage's output folder is the next one's ``--init``),
3. asks the trained model a question about a real CT slice and generates an image from it,
4. writes every stage's loss log and curve plus ``loss_curves.png`` (all stages), and prints a summary.

The model is tiny and random, so its answer and image show that the pipeline runs end to end,
not medical skill. The image tokenizer runs at 64 px by default (8 x 8 = 64 image tokens per
generation answer instead of the 32 x 32 = 1024 at 256 px; ``--image-size 256`` for the real
layout, several times slower on a CPU): the answer's length, not the model, sets a CPU's pace.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from healthgpt.cli import subcommand

__all__ = ["add_demo_arguments", "run_demo", "register", "demo", "loss_fell"]

STAGES = (
    (1, "mixed", "align"),
    (2, "mixed", "mixed"),
    (3, "mixed", "instruct"),
)


_SHORT = {1: "projectors + gen plugin", 2: "embeddings + lm_head", 3: "plugins + projectors"}


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", default="healthgpt-demo", help="output folder (default ./healthgpt-demo)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per stage (default 30)")
    parser.add_argument("--image-size", type=int, default=64, choices=(32, 64, 128, 256),
                        help="image tokenizer resolution: 64 -> 64 image tokens (default); 256 -> 1024, as the real model")
    parser.add_argument("--cache-dir", default=None, help="sample set and VQ-id cache (default $HEALTHGPT_CACHE or ~/.cache/healthgpt)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="show the Trainer's progress bars")
    return parser


def run_demo(args: argparse.Namespace) -> int:
    """``healthgpt demo``; 0 when every stage's loss fell, 1 otherwise."""
    result = demo(out=args.out, steps=args.steps, image_size=args.image_size, cache_dir=args.cache_dir,
                  seed=args.seed, progress=args.progress)
    return 0 if result["losses_fell"] else 1


def loss_fell(rows: list, key: str = "loss") -> tuple:
    """(mean of the first third, mean of the last third) of a loss log's ``key`` values."""
    vals = [r[key] for r in rows if r.get(key) is not None]
    if len(vals) < 2:
        return (vals[0], vals[0]) if vals else (None, None)
    k = max(1, len(vals) // 3)
    return sum(vals[:k]) / k, sum(vals[-k:]) / k


def _plot_all(stage_rows: list, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stage_rows), figsize=(4.2 * len(stage_rows), 3.4), dpi=100)
    for ax, (title, rows) in zip(axes, stage_rows):
        for key, style, label in (("loss", "-", "all"), ("loss_comp", "--", "comp"), ("loss_gen", ":", "gen")):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cross-entropy")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def demo(out: str = "healthgpt-demo", steps: int = 30, image_size: int = 64, cache_dir: str | None = None,
         seed: int = 0, progress: bool = False, log=print) -> dict:
    """Run the demo (module docstring) -> a summary dict (also written to ``out/summary.json``)."""
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    out = os.path.abspath(out)
    log = log or (lambda *a, **k: None)

    from healthgpt.model.config import TINY_VQ
    from healthgpt.data.samples import build_sample_set, default_cache_dir
    from healthgpt.training.run import TrainArguments, train_stage
    from healthgpt.training.trainer import read_loss_log

    cache_dir = cache_dir or default_cache_dir()
    samples = build_sample_set(cache_dir)
    counts = {name: len(json.load(open(getattr(samples, name)))) for name in ("align", "mixed", "instruct")}
    log(f"[demo] sample set: {samples.root} ({counts['align']} stage-1 rows, {counts['mixed']} stage-2, "
        f"{counts['instruct']} stage-3; real images from pydicom, nibabel, scikit-image)")

    overrides = {"image_tokenizer_config": dict(TINY_VQ, resolution=image_size)}
    stages, init = [], None
    for stage, task, data_name in STAGES:
        t = time.time()
        output = os.path.join(out, f"stage{stage}")
        log(f"[demo] stage {stage} ({task}) on {data_name}.json: {steps} steps ...")
        args = TrainArguments(stage=stage, task=task, data=getattr(samples, data_name), output=output, init=init,
                              preset="tiny", max_steps=steps, logging_steps=1, save_steps=max(1, steps // 2),
                              save_total_limit=1, seed=seed, cache_dir=cache_dir, overwrite=True, progress=progress)
        res = train_stage(args, model_overrides=overrides if init is None else None, quiet=not progress)
        rows = read_loss_log(output)
        first, last = loss_fell(rows)
        per_task = {t_: loss_fell(rows, f"loss_{t_}") for t_ in ("comp", "gen")}
        trained = ", ".join(g["name"] for g in res.summary["trained"])
        stages.append({"stage": stage, "task": task, "output": output, "steps": res.steps, "seconds": round(time.time() - t, 1),
                       "trained": trained, "loss_start": first, "loss_end": last,
                       "per_task": {k: {"start": v[0], "end": v[1]} for k, v in per_task.items() if v[0] is not None},
                       "fell": first is not None and last < first, "loss_curve": res.loss_curve})
        log(f"[demo]   trained {trained}: loss {first:.3f} -> {last:.3f} "
            f"(mean of the first vs last third of the steps) in {time.time() - t:.0f}s")
        init = output

    # ---- use the trained model ----------------------------------------------------------------------
    import torch

    from healthgpt.model.healthgpt import HealthGPT

    model = HealthGPT.from_pretrained(init).eval()
    torch.manual_seed(seed)
    answer = model.answer(samples.demo_image, samples.demo_question, max_new_tokens=16)
    image = model.generate_image(samples.demo_gen_image, samples.demo_gen_instruction)
    gen_path = os.path.join(out, "generated.png")
    image.save(gen_path)
    curves = _plot_all([(f"stage {s['stage']}: {_SHORT[s['stage']]}", read_loss_log(s["output"])) for s in stages],
                       os.path.join(out, "loss_curves.png"))
    summary = {
        "out": out, "seconds": round(time.time() - t0, 1), "stages": stages, "sample_set": samples.root,
        "question": {"image": samples.demo_image, "question": samples.demo_question, "answer": answer,
                     "reference": samples.demo_answer},
        "generation": {"image": samples.demo_gen_image, "instruction": samples.demo_gen_instruction, "output": gen_path,
                       "image_tokens": model.num_image_codes},
        "loss_curves": curves, "losses_fell": all(s["fell"] for s in stages),
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)

    log("")
    log("HealthGPT demo (tiny random model, CPU): stages 1 -> 2 -> 3 on real images from PyPI wheels")
    for s in stages:
        tasks = "  ".join(f"{k} {v['start']:.2f}->{v['end']:.2f}" for k, v in s["per_task"].items())
        log(f"  stage {s['stage']}: {s['steps']} steps, {s['seconds']:.0f}s, loss {s['loss_start']:.3f} -> {s['loss_end']:.3f}"
            f" [{tasks}]  {'fell' if s['fell'] else 'DID NOT FALL'}  ({s['trained']})")
    log("  (stage 1 barely moves the generation loss: the 8195 new token rows of lm_head start equal, so\n"
        "   image tokens cannot be told apart until stage 2 trains the embeddings and lm_head)")
    log(f"  Q: {samples.demo_question}  (real CT slice {os.path.basename(samples.demo_image)})")
    log(f"  A: {answer!r}  (reference: {samples.demo_answer!r}; a tiny random model is not expected to know)")
    log(f"  generated {image.size[0]}x{image.size[1]} image from {model.num_image_codes} tokens: {gen_path}")
    log(f"  loss curves: {curves} (and stage*/loss_curve.png); models: {', '.join(os.path.basename(s['output']) for s in stages)}")
    log(f"  total {summary['seconds']:.0f}s")
    return summary


register, main = subcommand('demo', 'train the tiny model through stages 1-3 on real images, on this CPU', __doc__, add_demo_arguments, run_demo)


if __name__ == "__main__":
    sys.exit(main())
