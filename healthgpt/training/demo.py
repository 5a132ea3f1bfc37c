"""``healthgpt demo``: a small, honest training experiment on a laptop CPU, nothing downloaded.

1. builds the bundled sample set from real medical images inside installed wheels (pydicom,
   nibabel, scikit-image; ``healthgpt.data.samples``): training files for the three stages and a
   held-out split no stage ever sees (other volume slices, other crops and windows of the CT slices,
   the other half of the fundus and pathology pictures; the split is printed),
2. builds the ``tiny`` HealthGPT preset (random weights) and gives its random image tokenizer a short
   pretraining on the training images only (``healthgpt.training.vq_pretrain``: autoencoder, k-means
   codebook, decoder fit; the real model's VQGAN is pretrained and frozen too; a random one decodes
   any code to noise),
3. scores the held-out split with the evaluation suite's own code (what ``healthgpt eval`` runs:
   ``runner.run_text``/``run_image``, ``scoring.score_text_rows``/``score_image_rows``: closed
   accuracy, open recall, SSIM/PSNR/MSE at the tokenizer's resolution) before training and after
   each stage, training stage 1 -> 2 -> 3 with the Trainer (each run's folder is the next one's ``--init``; stage 3
   is two runs, comprehension then generation, each training its own plugin and projector: ``RUNS``),
4. prints one table (untrained, stage 1, 2, 3 x closed accuracy, open recall, SSIM, PSNR) next to
   the majority-class baseline, writes it to ``DIR/summary.json``, the panel ``DIR/heldout_panel.png``
   (input | target | untrained | trained), every stage's loss log and ``DIR/loss_curves.png``.

The image tokenizer runs at 32 px by default (4 x 4 = 16 codes per image, one per vision patch,
instead of 1024 at 256 px): the answer's length, not the model, sets a CPU's pace. The goals (``GOALS``) are
reported as met or not; exit status 0 after a complete run, or, with ``--require-goals``, only when every goal is met.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace

from healthgpt.cli import subcommand

__all__ = ["add_demo_arguments", "run_demo", "register", "demo", "loss_fell", "DemoConfig", "QUICK", "GOALS",
           "evaluate_heldout", "majority_baseline", "check_goals"]

RUNS = (  # (stage, task, training file) of each training run; stage 3 trains each task's plugin + projector in its own
    (1, "mixed", "align"),  # run (the presets' stage-3 comp and gen columns), each with its own steps and batch
    (2, "mixed", "mixed"),
    (3, "comp", "instruct"),
    (3, "gen", "instruct"),
)
_SHORT = {1: "projectors + gen plugin", 2: "embeddings + lm_head", 3: "plugin + projector"}
VQA_BENCH = "slake"  # held-out questions are scored as a SLAKE-style VQA benchmark (closed yes/no + open)
IMAGE_BENCH = "reconstruction"  # image family; rows are grouped by their own task
GOALS = {"closed_gain": 30.0, "ssim_gain": 0.10}  # points of closed accuracy over untrained; SSIM (0..1) gain


@dataclass(frozen=True)
class DemoConfig:
    """What the demo trains, how long, at which rates: one entry of ``steps``, ``batch_sizes`` and ``lrs`` per
    ``RUNS`` entry (stage 1, stage 2, stage 3 comp, stage 3 gen). The default aims at ``GOALS`` within ~170 CPU
    seconds (benchmarks/RESULTS.md has what it measured and which goals it meets). Reading the image takes the
    comprehension plugin thousands of samples, so stage 3 comp gets most of them."""

    steps: tuple = (10, 160, 250, 150)  # optimizer steps of each run
    batch_sizes: tuple = (4, 4, 8, 4)  # one micro-batch per step
    lrs: tuple = ((1e-2, 1e-2), (1e-2, 2e-2), (3e-3, 3e-3), (5e-3, 5e-3))  # (projector lr, lr) per run
    vq_steps: tuple = (300, 200)  # image tokenizer: autoencoder steps, decoder steps on the k-means codebook
    vq_codes: int = 64  # k-means codebook size of the pretrained image tokenizer
    plugin_ranks: tuple = (64, 64)  # comp, gen H-LoRA total ranks (4 experts each): the tiny preset's 8 / 16 (2 / 4
    # per expert) do not learn to read the image in this budget; rank 16 per expert does (benchmarks/RESULTS.md)
    image_size: int = 32  # 4 x 4 = 16 codes per image: the vision tower's 4 x 4 patch grid
    max_new_tokens: int = 12
    threads: int = 1  # tiny matrices: a second thread (spinning on a shared CPU) costs more CPU time than it saves

    def __post_init__(self):
        for name in ("steps", "batch_sizes", "lrs"):
            if len(getattr(self, name)) != len(RUNS):
                raise ValueError(f"DemoConfig.{name} needs one entry per training run ({len(RUNS)}: stage 1, stage 2, "
                                 f"stage 3 comp, stage 3 gen), got {getattr(self, name)!r}")


QUICK = DemoConfig(steps=(10, 30, 20, 20), vq_steps=(60, 40))  # tests: learns something, not the goals


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = DemoConfig()
    parser.add_argument("--out", default="healthgpt-demo", help="output folder (default ./healthgpt-demo)")
    parser.add_argument("--steps", type=int, nargs=4, default=list(d.steps), metavar=("S1", "S2", "S3COMP", "S3GEN"),
                        help=f"optimizer steps of stage 1, stage 2, stage 3 comp, stage 3 gen (default {' '.join(map(str, d.steps))})")
    parser.add_argument("--vq-steps", type=int, nargs=2, default=list(d.vq_steps), metavar=("AE", "DEC"),
                        help=f"image tokenizer pretraining: autoencoder steps, decoder steps (default {' '.join(map(str, d.vq_steps))})")
    parser.add_argument("--image-size", type=int, default=d.image_size, choices=(32, 64, 128, 256),
                        help="image tokenizer resolution: 32 -> 16 image tokens (default); 256 -> 1024, as the real model")
    parser.add_argument("--cache-dir", default=None, help="sample set and VQ-id cache (default $HEALTHGPT_CACHE or ~/.cache/healthgpt)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="show the Trainer's progress bars")
    parser.add_argument("--require-goals", action="store_true",
                        help="exit with status 1 unless every held-out goal is met (default: report them, exit 0)")
    return parser


def run_demo(args: argparse.Namespace) -> int:
    """``healthgpt demo``; 0 after a complete run (with ``--require-goals``: only when every goal is met)."""
    config = replace(DemoConfig(), steps=tuple(args.steps), vq_steps=tuple(args.vq_steps), image_size=args.image_size)
    result = demo(out=args.out, config=config, cache_dir=args.cache_dir, seed=args.seed, progress=args.progress)
    return 0 if all(result["goals"].values()) or not args.require_goals else 1


def loss_fell(rows: list, key: str = "loss") -> tuple:
    """(mean of the first third, mean of the last third) of a loss log's ``key`` values."""
    vals = [r[key] for r in rows if r.get(key) is not None]
    if len(vals) < 2:
        return (vals[0], vals[0]) if vals else (None, None)
    k = max(1, len(vals) // 3)
    return sum(vals[:k]) / k, sum(vals[-k:]) / k


def majority_baseline(vqa_samples: list) -> tuple:
    """(accuracy in percent, answer) of always giving the most common closed answer of the held-out split."""
    closed = [s["answer"] for s in vqa_samples if s["answer_type"] == "closed"]
    answer, count = Counter(closed).most_common(1)[0]
    return 100.0 * count / len(closed), answer


def check_goals(untrained: dict, final: dict, baseline: float) -> dict:
    """``GOALS`` -> ``{goal: met}`` for the untrained and final held-out scores and the majority baseline (%)."""
    return {
        f"closed accuracy >= untrained + {GOALS['closed_gain']:g} points": final["closed"] >= untrained["closed"] + GOALS["closed_gain"],
        # the scorer rounds its percentages to 4 decimals (57.1429 for 16/28) and the baseline is exact: equal
        # accuracies differ by up to 5e-5 points, one question more is >= 100/len(closed) points
        "closed accuracy > majority-class baseline": final["closed"] > baseline + 0.01,
        f"SSIM >= untrained + {GOALS['ssim_gain']:g}": final["ssim"] >= untrained["ssim"] + GOALS["ssim_gain"],
    }


# ---- scoring the held-out split with the evaluation suite -----------------------------------------------


def evaluate_heldout(model, samples, out: str, max_new_tokens: int = 12) -> dict:
    """Score ``model`` on the held-out split exactly as ``healthgpt eval`` would: predictions in
    ``out/vqa`` and ``out/gen`` (replaced), -> ``{closed, open_recall, ssim (0..1), psnr, mse, tasks, n_*}``."""
    from healthgpt.evaluation.data import load_samples
    from healthgpt.evaluation.model_adapter import callables_from_model
    from healthgpt.evaluation.runner import default_image_loader, run_image, run_text
    from healthgpt.evaluation.scoring import score_image_rows, score_text_rows

    shutil.rmtree(out, ignore_errors=True)  # the runner resumes: never score an earlier run's predictions
    answer_batch, generate_batch = callables_from_model(model, max_new_tokens)
    load_image = default_image_loader()
    vqa = load_samples(VQA_BENCH, samples.heldout_vqa)
    rows = run_text(VQA_BENCH, vqa, answer_batch, os.path.join(out, "vqa"), batch_size=32, progress=False)
    text, _ = score_text_rows(VQA_BENCH, rows, open_scoring="recall")
    pairs = load_samples(IMAGE_BENCH, samples.heldout_gen)
    rows = run_image(IMAGE_BENCH, pairs, generate_batch, os.path.join(out, "gen"), batch_size=len(pairs), progress=False)
    images, _ = score_image_rows(IMAGE_BENCH, rows, os.path.join(out, "gen"), load_image)
    return {"closed": text["close"], "open_recall": text["open_recall"], "ssim": images["ssim"] / 100.0,
            "psnr": images["psnr"], "mse": images["mse"], "n_closed": text["n_closed"], "n_open": text["n_open"],
            "n_images": images["n"], "closed_unparsed": text["closed_unparsed"],
            "tasks": {t: {"ssim": v["ssim"] / 100.0, "psnr": v["psnr"]} for t, v in images["tasks"].items()},
            "predictions": {"vqa": os.path.join(out, "vqa", "predictions.jsonl"),
                            "gen": os.path.join(out, "gen", "predictions.jsonl")}}


def tokenizer_ceiling(model, samples) -> dict:
    """SSIM/PSNR of the targets encoded and decoded by the image tokenizer: the best any LLM can do."""
    from healthgpt.data.images import load_image
    from healthgpt.evaluation.data import load_samples
    from healthgpt.evaluation.scoring import summarise_images
    from healthgpt.evaluation.image_metrics import image_scores

    pairs = load_samples(IMAGE_BENCH, samples.heldout_gen)
    targets = [load_image(p["target"]) for p in pairs]
    decoded = model.image_tokenizer.decode_images(model.image_tokenizer.encode_images(targets))
    scored = [{"task": p["task"], **image_scores(d, t)} for p, d, t in zip(pairs, decoded, targets)]
    s = summarise_images(IMAGE_BENCH, scored, "unused")
    return {"ssim": s["ssim"] / 100.0, "psnr": s["psnr"]}


# ---- outputs ----------------------------------------------------------------------------------------------


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


def _panel(first: dict, last: dict, path: str, tile: int = 128) -> str:
    """Held-out image pairs, one row each: input | target | untrained output | trained output."""
    from PIL import Image

    from healthgpt.data.images import load_image
    from healthgpt.evaluation.runner import read_predictions
    from healthgpt.evaluation.scoring import make_panel

    base = {k: os.path.dirname(v["predictions"]["gen"]) for k, v in (("first", first), ("last", last))}
    before = {r["id"]: r for r in read_predictions(first["predictions"]["gen"])}
    def generated(path):  # at the tokenizer's few pixels: enlarged (nearest) so each pixel stays visible
        return load_image(path).resize((tile, tile), Image.NEAREST)

    rows = []
    for r in read_predictions(last["predictions"]["gen"]):
        b = before[r["id"]]
        rows.append(make_panel([load_image(r["image"]), load_image(r["target"]),
                                generated(os.path.join(base["first"], b["prediction"])),
                                generated(os.path.join(base["last"], r["prediction"]))],
                               ["input", "target", "untrained", "after stage 3"], f"{r['id']} ({r['task']})", tile=tile))
    panel = Image.new("RGB", (rows[0].width, sum(p.height for p in rows)))
    y = 0
    for p in rows:
        panel.paste(p, (0, y))
        y += p.height
    panel.save(path)
    return path


def _run_title(run: dict) -> str:
    return f"stage {run['stage']}" + (f" {run['task']}" if run["task"] != "mixed" else "")


def _table(rows: list, baseline: float, ceiling: dict) -> str:
    lines = [f"  {'held-out':10s} {'closed acc':>10s} {'open recall':>11s} {'SSIM':>6s} {'PSNR':>6s}"]
    for r in rows:
        lines.append(f"  {r['model']:10s} {r['closed']:9.1f}% {r['open_recall']:10.1f}% {r['ssim']:6.3f} {r['psnr']:6.2f}")
    lines.append(f"  {'baseline':10s} {baseline:9.1f}% {'':>11s} {ceiling['ssim']:6.3f} {ceiling['psnr']:6.2f}"
                 f"   (majority class; tokenizer's own reconstruction)")
    return "\n".join(lines)


def _cpu_seconds() -> float:
    """User + system CPU time of this process (every thread)."""
    t = os.times()
    return t.user + t.system


# ---- the demo -----------------------------------------------------------------------------------------


def demo(out: str = "healthgpt-demo", config: DemoConfig = DemoConfig(), cache_dir: str | None = None, seed: int = 0,
         progress: bool = False, log=print) -> dict:
    """Run the demo (module docstring) with ``config.threads`` torch threads -> a summary dict (also written
    to ``out/summary.json``)."""
    import torch  # lazy like the imports in _demo: the CLI parses its arguments without torch

    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _demo(out, config, cache_dir, seed, progress, log)
    finally:
        torch.set_num_threads(threads)


def _demo(out: str, config: DemoConfig, cache_dir: str | None, seed: int, progress: bool, log) -> dict:
    t0, cpu0 = time.time(), _cpu_seconds()
    os.makedirs(out, exist_ok=True)
    out = os.path.abspath(out)
    log = log or (lambda *a, **k: None)

    import torch

    from healthgpt.data.samples import build_sample_set, default_cache_dir
    from healthgpt.evaluation.data import load_samples
    from healthgpt.model.config import TINY_VQ, HealthGPTConfig, _plugins
    from healthgpt.model.healthgpt import HealthGPT
    from healthgpt.training.run import TrainArguments, train_stage
    from healthgpt.training.trainer import read_loss_log
    from healthgpt.training.vq_pretrain import pretrain_image_tokenizer

    cache_dir = cache_dir or default_cache_dir()
    samples = build_sample_set(cache_dir)
    rows_of = {name: json.load(open(getattr(samples, name))) for name in ("align", "mixed", "instruct")}
    heldout = load_samples(VQA_BENCH, samples.heldout_vqa)
    baseline, majority = majority_baseline(heldout)
    log(f"[demo] sample set: {samples.root} ({len(rows_of['align'])} stage-1 rows, {len(rows_of['mixed'])} stage-2, "
        f"{len(rows_of['instruct'])} stage-3; real images from pydicom, nibabel, scikit-image)")
    log(f"[demo] {samples.split}; {len(heldout)} held-out questions, "
        f"{len(load_samples(IMAGE_BENCH, samples.heldout_gen))} held-out image pairs")

    grid = config.image_size // 8
    vq = dict(TINY_VQ, resolution=config.image_size, attn_resolutions=(grid,))  # attention at the code grid, as the real f=8 VQGAN
    torch.manual_seed(seed)  # the random weights, then the stages (seeded by the Trainer): one seed, one run
    model = HealthGPT(HealthGPTConfig.preset("tiny", image_tokenizer_config=vq, plugins=_plugins(*config.plugin_ranks)))
    train_images = sorted({os.path.join(samples.root, r[k]) for r in rows_of["mixed"] for k in ("image", "target_image") if k in r})
    vq_result = pretrain_image_tokenizer(model.image_tokenizer, train_images, ae_steps=config.vq_steps[0],
                                         decoder_steps=config.vq_steps[1], active_codes=config.vq_codes, seed=seed, log=log)
    ceiling = tokenizer_ceiling(model, samples)

    t = time.time()
    scores = [{"model": "untrained", **evaluate_heldout(model, samples, os.path.join(out, "eval", "untrained"), config.max_new_tokens),
               "seconds": round(time.time() - t, 1)}]
    log(f"[demo] untrained: held-out closed accuracy {scores[0]['closed']:.1f}%, SSIM {scores[0]['ssim']:.3f} ({time.time() - t:.0f}s)")
    stages, init = [], None
    for i, ((stage, task, data_name), steps, batch, (projector_lr, lr)) in enumerate(
            zip(RUNS, config.steps, config.batch_sizes, config.lrs)):
        t = time.time()
        name = f"stage{stage}" + (f"_{task}" if task != "mixed" else "")
        output = os.path.join(out, name)
        log(f"[demo] stage {stage} ({task}) on {data_name}.json: {steps} steps of {batch} ...")
        args = TrainArguments(stage=stage, task=task, data=getattr(samples, data_name), output=output, init=init,
                              preset="tiny", max_steps=steps, global_batch_size=batch, lr=lr,
                              projector_lr=projector_lr, logging_steps=1, save_steps=steps, save_total_limit=1, seed=seed,
                              cache_dir=cache_dir, overwrite=True, progress=progress)
        res = train_stage(args, model=model if init is None else None, quiet=not progress)
        rows = read_loss_log(output)
        first, last = loss_fell(rows)
        per_task = {t_: loss_fell(rows, f"loss_{t_}") for t_ in ("comp", "gen")}
        trained = ", ".join(g["name"] for g in res.summary["trained"])
        train_seconds = time.time() - t
        stages.append({"stage": stage, "task": task, "output": output, "steps": res.steps, "batch": batch,
                       "seconds": round(train_seconds, 1), "trained": trained, "lr": lr, "projector_lr": projector_lr,
                       "loss_start": first, "loss_end": last,
                       "per_task": {k: {"start": v[0], "end": v[1]} for k, v in per_task.items() if v[0] is not None},
                       "fell": first is not None and last < first, "loss_curve": res.loss_curve})
        log(f"[demo]   trained {trained}: loss {first:.3f} -> {last:.3f} in {train_seconds:.0f}s")
        init, model = output, None
        if i + 1 < len(RUNS) and RUNS[i + 1][0] == stage:
            continue  # the stage's other run next: score the stage once both are done
        trained_model = HealthGPT.from_pretrained(output).eval()
        score = evaluate_heldout(trained_model, samples, os.path.join(out, "eval", f"stage{stage}"), config.max_new_tokens)
        scores.append({"model": f"stage {stage}", **score, "seconds": round(time.time() - t - train_seconds, 1)})
        log(f"[demo]   stage {stage}: held-out closed accuracy {score['closed']:.1f}%, open recall "
            f"{score['open_recall']:.1f}%, SSIM {score['ssim']:.3f}")

    first_row, final = scores[0], scores[-1]
    goals = check_goals(first_row, final, baseline)
    panel = _panel(first_row, final, os.path.join(out, "heldout_panel.png"))
    curves = _plot_all([(_run_title(s) + f": {_SHORT[s['stage']]}", read_loss_log(s["output"])) for s in stages],
                       os.path.join(out, "loss_curves.png"))
    table = [{k: r[k] for k in ("model", "closed", "open_recall", "ssim", "psnr", "mse")} for r in scores]
    learned = [
        f"held-out closed (yes/no) accuracy {first_row['closed']:.1f}% -> {final['closed']:.1f}% (majority-class baseline "
        f"{baseline:.1f}%, always '{majority}'); open-answer recall {first_row['open_recall']:.1f}% -> {final['open_recall']:.1f}%",
        f"held-out generated images SSIM {first_row['ssim']:.3f} -> {final['ssim']:.3f}, PSNR {first_row['psnr']:.2f} -> "
        f"{final['psnr']:.2f} dB (the tokenizer's own reconstruction of the targets: SSIM {ceiling['ssim']:.3f}); by task: "
        + ", ".join(f"{task} {first_row['tasks'][task]['ssim']:.3f} -> {v['ssim']:.3f}" for task, v in final["tasks"].items()),
    ]
    summary = {
        "out": out, "seconds": round(time.time() - t0, 1), "cpu_seconds": round(_cpu_seconds() - cpu0, 1), "config": asdict(config), "seed": seed,
        "sample_set": samples.root, "split": samples.split, "heldout": {"vqa": samples.heldout_vqa, "gen": samples.heldout_gen},
        "table": table, "scores": scores, "majority_baseline": {"closed": baseline, "answer": majority},
        "image_tokenizer": {**asdict(vq_result), "ceiling": ceiling}, "goals": goals, "learned": learned,
        "stages": stages, "losses_fell": all(s["fell"] for s in stages), "panel": panel, "loss_curves": curves,
        "protocol": "healthgpt eval's scorers: strict closed yes/no, open token recall; SSIM/PSNR at the tokenizer's "
                    f"{config.image_size} px (targets resized)",
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)

    log("")
    log("HealthGPT demo (tiny model from random weights, CPU): stages 1 -> 2 -> 3, scored on a held-out split")
    log(f"  {samples.split}")
    log(f"  image tokenizer: {config.vq_steps[0]} autoencoder steps on the {vq_result.images} training images, a k-means "
        f"codebook of {vq_result.active_codes} codes, {config.vq_steps[1]} decoder steps; then frozen like the real model's")
    for s in stages:
        tasks = "  ".join(f"{k} {v['start']:.2f}->{v['end']:.2f}" for k, v in s["per_task"].items())
        log(f"  {_run_title(s)}: {s['steps']} steps of {s['batch']}, {s['seconds']:.0f}s, loss {s['loss_start']:.3f} -> "
            f"{s['loss_end']:.3f} [{tasks}]  ({s['trained']})")
    log(_table(scores, baseline, ceiling))
    for goal, met in goals.items():
        log(f"  goal {'met' if met else 'NOT MET'}: {goal}")
    log("What was learned:")
    for line in learned:
        log(f"  {line}")
    log(f"  panel: {panel}; loss curves: {curves}; table: {os.path.join(out, 'summary.json')}")
    log(f"  total {summary['seconds']:.0f}s ({summary['cpu_seconds']:.0f} CPU s)")
    return summary


register, main = subcommand('demo', 'train the tiny model through stages 1-3 on real images and score a held-out split, on this CPU',
                            __doc__, add_demo_arguments, run_demo)


if __name__ == "__main__":
    sys.exit(main())
