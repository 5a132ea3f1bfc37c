"""``healthgpt eval``: score a model (or a predictions file) on one of the paper's benchmarks.

    healthgpt eval --bench slake --data slake/test.json --weights DIR --out runs/slake
    healthgpt eval --bench slake --predictions runs/slake/predictions.jsonl --out runs/slake-rescore
    healthgpt eval --combine runs/slake runs/vqa-rad runs/omni --out runs/tables
    healthgpt eval --bench vqa-rad --predictions P.jsonl --protocol llava-med --out runs/rad-published

Writes to ``--out``: ``predictions.jsonl`` (inference runs; resumable), ``scores.jsonl``
(per-sample scores), ``summary.json`` (metrics in percent as the paper prints them: VQA
``close``/``open``/``all``, multiple choice ``accuracy`` and one key per modality, images
``ssim``/``psnr``/``mse``/``lpips`` overall and per task under ``tasks``), ``table.md`` (the
paper's column layout, also printed), and for image tasks ``images/`` and ``panels/``.
Text benchmarks are scored under both protocols (``strict``, ``llava-med``: see
``healthgpt.evaluation.protocols``); ``--protocol`` picks the one behind the plain keys.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from healthgpt.evaluation.data import BENCHMARKS, load_samples
from healthgpt.evaluation.llava_med import load_candidates
from healthgpt.evaluation.model_adapter import callables_from_model
from healthgpt.evaluation.protocols import DEFAULT_PROTOCOL, PROTOCOLS
from healthgpt.evaluation.report import bench_tables, combined_tables
from healthgpt.evaluation.runner import PREDICTIONS, default_image_loader, read_predictions, run_image, run_text
from healthgpt.evaluation.scoring import LPIPS_UNAVAILABLE, score_image_rows, score_text_rows
from healthgpt.cli import TINY_WARNING, CLIError, add_model_arguments, model_from_args, subcommand

__all__ = ["add_eval_arguments", "run_eval", "register", "main"]


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``healthgpt eval`` options to ``parser``."""
    parser.add_argument("--bench", choices=sorted(BENCHMARKS), help="benchmark to score")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--data", help="benchmark data file (.json/.jsonl; formats: healthgpt.evaluation.data)")
    src.add_argument("--predictions", help="re-score this predictions.jsonl without a model")
    src.add_argument("--combine", nargs="+", metavar="DIR",
                     help="print the paper tables from the summary.json of earlier runs")
    parser.add_argument("--out", required=True, help="output folder")
    add_model_arguments(parser)  # --weights, --device, --seed
    parser.add_argument("--model-name", help="row label in the tables (default: weights folder name)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, help="score only the first N samples")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--open-scoring", choices=("auto", "recall", "choice"), default="auto",
                        help="VQA open questions: token recall (LLaVA-Med) or multiple choice; "
                             "auto = choice when every open question has options")
    parser.add_argument("--protocol", choices=PROTOCOLS, default=DEFAULT_PROTOCOL,
                        help="scoring rules behind close/open/all/accuracy: strict (ours) or llava-med "
                             "(LLaVA-Med's run_eval.py for VQA, HuatuoGPT-Vision's option matcher for "
                             "multiple choice); summary.json always holds both")
    parser.add_argument("--candidates", metavar="FILE",
                        help="VQA: candidate-answer set (JSON list, or LLaVA-Med's train_open_answers.json) "
                             "for LLaVA-Med's open accuracy")
    parser.add_argument("--lang", default="en", help="keep SLAKE rows with this q_lang ('all' keeps every row)")
    parser.add_argument("--lpips-weights", nargs="+", metavar="FILE",
                        help="local LPIPS weights: backbone (torchvision alexnet/vgg16) and linear layers")
    parser.add_argument("--no-panels", action="store_true", help="image tasks: skip the PNG panels")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _err(msg: str):
    """A usage error, raised for ``healthgpt.cli.run_guarded`` to report (exit status 2)."""
    raise CLIError(msg)


def _combine(args) -> int:
    summaries = []
    for d in args.combine:
        p = Path(d) / "summary.json" if Path(d).is_dir() else Path(d)
        if not p.exists():
            return _err(f"no summary.json in {d}")
        summaries.append(json.loads(p.read_text()))
    text = combined_tables(summaries)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tables.md").write_text(text)
    print(text)
    return 0


def run_eval(args, answer_batch=None, generate_batch=None, load_image=None) -> int:
    """Run ``healthgpt eval`` with parsed ``args``; returns the exit status.

    ``answer_batch``/``generate_batch``/``load_image`` replace the model and the image reader
    (tests, other models); by default the model comes from ``--weights`` (or the tiny preset)."""
    if args.combine:
        return _combine(args)
    if not args.bench:
        return _err("--bench is required")
    if not args.data and not args.predictions:
        return _err("give --data (run the model) or --predictions (re-score)")
    bench, spec = args.bench, BENCHMARKS[args.bench]
    candidates = None
    if args.candidates:
        if spec.family != "vqa":
            return _err("--candidates applies to the VQA benchmarks (vqa-rad, slake, pathvqa)")
        try:
            candidates = load_candidates(json.loads(Path(args.candidates).read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            return _err(f"--candidates {args.candidates}: {e}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    notes = []
    if args.model_name:
        model_name = args.model_name
    elif args.weights:
        model_name = Path(args.weights).name
    elif args.predictions:
        model_name = "predictions"
    elif answer_batch is not None or generate_batch is not None:
        model_name = "model"
    else:
        model_name = "HealthGPT (tiny, random weights)"
    load_image = load_image or default_image_loader()

    if args.predictions:
        pred_path = Path(args.predictions)
        if not pred_path.exists():
            return _err(f"no such predictions file: {pred_path}")
        rows = read_predictions(pred_path, bench=bench, allow_empty=False)
        if args.limit is not None:
            rows = rows[:args.limit]
        base = pred_path.resolve().parent
    else:
        lang = None if args.lang in (None, "", "all") else args.lang
        samples = load_samples(bench, args.data, lang=lang, limit=args.limit)
        if not samples:
            return _err(f"{args.data}: no samples")
        need = generate_batch if spec.family == "image" else answer_batch
        if need is None:
            if not args.weights:
                notes.append(TINY_WARNING)
            model = model_from_args(args)
            answer_batch, generate_batch = callables_from_model(model, args.max_new_tokens)
        runner = run_image if spec.family == "image" else run_text
        fn = generate_batch if spec.family == "image" else answer_batch
        rows = runner(bench, samples, fn, out, batch_size=args.batch_size, load_image=load_image,
                      progress=not args.no_progress)
        pred_path, base = out / PREDICTIONS, out.resolve()

    if spec.family == "image":
        lpips_model, status = None, LPIPS_UNAVAILABLE
        if args.lpips_weights:
            from healthgpt.evaluation.lpips import load_lpips
            lpips_model = load_lpips(args.lpips_weights, device="cpu")
            status = "ok"
        summary, scored = score_image_rows(bench, rows, base, load_image, lpips_model=lpips_model,
                                           lpips_status=status,
                                           panels_dir=None if args.no_panels else out / "panels")
    else:
        summary, scored = score_text_rows(bench, rows, args.open_scoring,
                                          args.protocol, candidates)

    summary = {"bench": bench, "benchmark": spec.title, "model": model_name, **summary,
               "predictions": str(pred_path), "data": args.data, "weights": args.weights,
               "candidates": args.candidates,
               "notes": notes, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_jsonl(out / "scores.jsonl", scored)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    table = bench_tables(bench, summary, model_name)
    if notes:
        table += "\n" + "\n".join(f"> warning: {n}" for n in notes) + "\n"
    (out / "table.md").write_text(table)
    print(table)
    return 0


register, main = subcommand('eval', "score a model on the paper's benchmarks and print its tables", __doc__, add_eval_arguments, run_eval)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
