"""Score prediction rows of any benchmark into ``(summary, per_row_scores)``.

Text benchmarks use ``vqa.score_vqa_row``/``vqa.summarise_vqa`` and
``choice.score_choice_row``/``choice.summarise_choice_protocols``, under both scoring
protocols (``protocols.py``; ``protocol`` picks the one behind the plain summary keys). Image benchmarks load each row's
prediction and target (paths relative to the predictions file's folder, or absolute), compute
``image_metrics.image_scores`` and, when an LPIPS model is given, ``lpips.lpips_distance``; they
also draw ``panels/<id>.png`` (input | prediction | target).

Image summary keys (overall and per task under ``tasks``): ``ssim`` (x100, mean over images),
``psnr`` (dB, mean over images with MSE > 0), ``mse`` (mean), ``lpips`` (x100 mean, or
``None`` with ``lpips_status`` saying why), ``psnr_identical`` (images equal to their target,
left out of the PSNR mean), ``psnr_of_mean_mse`` and ``n``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from healthgpt.evaluation.choice import score_choice_row, summarise_choice_protocols
from healthgpt.evaluation.data import BENCHMARKS
from healthgpt.evaluation.image_metrics import image_scores, resize_to, to_gray255
from healthgpt.evaluation.protocols import DEFAULT_PROTOCOL, check_protocol
from healthgpt.evaluation.vqa import score_vqa_row, summarise_vqa

__all__ = ["score_rows", "score_text_rows", "score_image_rows", "summarise_images", "make_panel",
           "TASK_ORDER", "LPIPS_UNAVAILABLE"]

LPIPS_UNAVAILABLE = "unavailable: no LPIPS weights given (--lpips-weights BACKBONE LINEAR)"

# Column groups of the paper's Tables 2 (modality conversion) and 11 (reconstruction).
TASK_ORDER = {
    "modality-conversion": ("CT to MRI (Brain)", "CT to MRI (Pelvis)", "MRI to CT (Brain)",
                            "MRI to CT (Pelvis)"),
    "reconstruction": ("CT(Brain)", "CT(Pelvis)", "MRI (Brain)", "MRI(Pelvis)"),
}


def _canon_task(t: str) -> str:
    return "".join(ch for ch in str(t).lower() if ch.isalnum())


def ordered_tasks(bench: str, tasks) -> list[str]:
    """Tasks in the paper's column order (known labels first, matched ignoring case/spaces)."""
    tasks = list(dict.fromkeys(tasks))
    rank = {_canon_task(t): i for i, t in enumerate(TASK_ORDER.get(bench, ()))}
    return sorted(tasks, key=lambda t: (rank.get(_canon_task(t), len(rank)), tasks.index(t)))


def score_text_rows(bench: str, rows: list[dict], open_scoring: str = "auto",
                    protocol: str = DEFAULT_PROTOCOL, candidates: list | None = None) -> tuple[dict, list[dict]]:
    """Summary and per-row scores of a VQA or multiple-choice benchmark; ``candidates`` (VQA
    only) is the answer set of LLaVA-Med's open "accuracy"."""
    spec = BENCHMARKS[bench]
    check_protocol(protocol)
    for r in rows:
        missing = [k for k in ("id", "answer", "prediction") if r.get(k) is None]
        if missing:
            raise ValueError(f"prediction row {r.get('id')!r} lacks {missing}")
    if spec.family == "vqa":
        scored = [score_vqa_row(r, protocol, candidates) for r in rows]
        return summarise_vqa(scored, open_scoring, protocol), scored
    if candidates:
        raise ValueError(f"{bench}: a candidate-answer set applies to VQA benchmarks only")
    scored = []
    for r in rows:
        if not r.get("options"):
            raise ValueError(f"row {r.get('id')!r} has no options")
        s = score_choice_row(r.get("prediction"), r.get("answer"), list(r["options"]), protocol)
        scored.append({"id": r["id"], "modality": r.get("modality"), **s})
    return summarise_choice_protocols(scored, spec.macro_over_modalities, protocol), scored


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _r(x, nd=4):
    return None if x is None else round(float(x), nd)


def _aggregate(items: list[dict], lpips_on: bool) -> dict:
    mses = [s["mse"] for s in items]
    mean_mse = _mean(mses)
    return {
        "ssim": _r(100.0 * _mean(s["ssim"] for s in items)) if items else None,
        "psnr": _r(_mean(s["psnr"] for s in items if s["psnr"] is not None)),
        "mse": _r(mean_mse),
        "lpips": _r(100.0 * _mean(s["lpips"] for s in items)) if lpips_on and items else None,
        "psnr_identical": sum(1 for s in items if s["identical"]),
        "psnr_of_mean_mse": (None if not mean_mse else _r(10 * math.log10(255.0 ** 2 / mean_mse))),
        "n": len(items),
    }


def summarise_images(bench: str, scored: list[dict], lpips_status: str) -> dict:
    """Overall and per-task summary of per-image scores (keys in the module docstring)."""
    lpips_on = lpips_status == "ok"
    out = _aggregate(scored, lpips_on)
    out["lpips_status"] = lpips_status
    out["tasks"] = {t: _aggregate([s for s in scored if s["task"] == t], lpips_on)
                    for t in ordered_tasks(bench, (s["task"] for s in scored))}
    out["resized_targets"] = sum(1 for s in scored if s.get("resized"))
    return out


def _resolve(p, base: Path) -> Path:
    p = Path(p).expanduser()
    return p if p.is_absolute() else base / p


def make_panel(images: list, labels: list[str], caption: str = "", tile: int = 256):
    """Side-by-side RGB panel of ``images`` (PIL, arrays or ``None``), each fitted into a
    ``tile`` square, labels above and ``caption`` below."""
    from PIL import Image, ImageDraw
    import numpy as np
    head, foot, n = 18, 18 if caption else 0, len(images)
    panel = Image.new("RGB", (n * tile, head + tile + foot), "black")
    draw = ImageDraw.Draw(panel)
    for i, (img, label) in enumerate(zip(images, labels)):
        draw.text((i * tile + 4, 3), label, fill="white")
        if img is None:
            draw.text((i * tile + 4, head + tile // 2), "(missing)", fill="gray")
            continue
        if not isinstance(img, Image.Image) or img.mode not in ("RGB", "L", "RGBA"):
            img = Image.fromarray(np.clip(to_gray255(img), 0, 255).astype("uint8"), mode="L")
        img = img.convert("RGB")
        img.thumbnail((tile, tile))
        panel.paste(img, (i * tile + (tile - img.width) // 2, head + (tile - img.height) // 2))
    if caption:
        draw.text((4, head + tile + 3), caption, fill="white")
    return panel


def score_image_rows(bench: str, rows: list[dict], base_dir, load_image: Callable,
                     lpips_model=None, lpips_status: str = LPIPS_UNAVAILABLE,
                     panels_dir=None) -> tuple[dict, list[dict]]:
    """Summary and per-image scores of an image benchmark; draws missing panels into
    ``panels_dir`` when given."""
    from healthgpt.evaluation.lpips import lpips_distance
    from healthgpt.evaluation.runner import safe_name
    base = Path(base_dir)
    if panels_dir is not None:
        Path(panels_dir).mkdir(parents=True, exist_ok=True)
    scored = []
    for r in rows:
        pred_img = load_image(str(_resolve(r["prediction"], base)))
        target_img = load_image(str(_resolve(r["target"], base)))
        s = image_scores(pred_img, target_img)
        if lpips_model is not None:
            p = to_gray255(pred_img)
            s["lpips"] = lpips_distance(lpips_model, p, resize_to(to_gray255(target_img), p.shape))
        scored.append({"id": r["id"], "task": r.get("task") or bench, **s})
        if panels_dir is not None:
            out = Path(panels_dir) / f"{safe_name(r['id'])}.png"
            if not out.exists():
                inp = None
                if r.get("image"):
                    try:
                        inp = load_image(str(_resolve(r["image"], base)))
                    except (OSError, ValueError):
                        inp = None
                psnr_txt = "inf" if s["psnr"] is None else f"{s['psnr']:.2f}"
                cap = f"{r['id']}  SSIM {100 * s['ssim']:.2f}  PSNR {psnr_txt}  MSE {s['mse']:.2f}"
                make_panel([inp, pred_img, target_img], ["input", "prediction", "target"],
                           cap).save(out)
    status = "ok" if lpips_model is not None else lpips_status
    return summarise_images(bench, scored, status), scored


def score_rows(bench: str, rows: list[dict], **kw) -> tuple[dict, list[dict]]:
    """Dispatch on the benchmark family (``open_scoring``/``protocol``/``candidates`` for text;
    image kwargs for images)."""
    if BENCHMARKS[bench].family == "image":
        return score_image_rows(bench, rows, **kw)
    text_kw = ("open_scoring", "protocol", "candidates")
    return score_text_rows(bench, rows, **{k: v for k, v in kw.items() if k in text_kw})
