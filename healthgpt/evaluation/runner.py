"""Batched, resumable inference: samples in, one JSONL row per sample out.

The runner only needs two callables (so it is testable without a model):

- ``AnswerBatch(images, prompts) -> list[str]`` for the text benchmarks;
- ``GenerateBatch(images, instructions) -> list[PIL.Image]`` for the image benchmarks.

``images`` are whatever ``load_image(path)`` returns (default ``healthgpt.data.images.load_image``,
the reader training data and inference use); ``None`` for a sample without an image.

Output in ``out_dir``: ``predictions.jsonl``, appended and flushed (``fsync``) after every batch.
A rerun skips the ids already there (resume); a half-written last line left by a crash is cut
off first. Image predictions are saved as ``images/<id>.png`` before their row is written.

Text rows: ``id, question, answer, prediction, answer_type, prompt, image`` and ``options`` /
``modality`` when the sample has them. Image rows: ``id, image, target, instruction, task,
prediction`` (the PNG's path relative to the predictions file).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

from tqdm.auto import tqdm

from healthgpt.data.images import load_image
from healthgpt.evaluation.choice import choice_prompt
from healthgpt.evaluation.data import BENCHMARKS

__all__ = ["AnswerBatch", "GenerateBatch", "default_image_loader", "read_predictions",
           "repair_jsonl", "safe_name", "prompt_for", "run_text", "run_image", "PREDICTIONS"]

AnswerBatch = Callable[[Sequence, Sequence[str]], Sequence[str]]
GenerateBatch = Callable[[Sequence, Sequence[str]], Sequence]
PREDICTIONS = "predictions.jsonl"


def default_image_loader() -> Callable:
    """``healthgpt.data.images.load_image`` (PNG/JPEG/DICOM/NIfTI -> 8-bit RGB), the one reader."""
    return load_image


def repair_jsonl(path) -> int:
    """Cut a trailing partial line (no final newline) from ``path``; returns bytes removed."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(keep)
    warnings.warn(f"{path}: removed a half-written last line ({len(data) - keep} bytes)", stacklevel=2)
    return len(data) - keep


def read_predictions(path) -> list[dict]:
    """Rows of a predictions JSONL file; a half-written last line is skipped with a warning,
    and for a repeated id the last row wins."""
    path = Path(path)
    if not path.exists():
        return []
    rows: dict[str, dict] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: skipping a half-written last line", stacklevel=2)
                continue
            raise ValueError(f"{path}:{i + 1}: not JSON") from None
        if "id" not in row:
            raise ValueError(f"{path}:{i + 1}: row without 'id'")
        row["id"] = str(row["id"])
        rows[row["id"]] = row
    return list(rows.values())


def safe_name(sid: str) -> str:
    """A file name for id ``sid`` (a short hash is appended when characters had to be replaced)."""
    s = re.sub(r"[^A-Za-z0-9._-]", "_", sid)[:100]
    return s if s == sid else f"{s}_{hashlib.sha1(sid.encode()).hexdigest()[:8]}"


def prompt_for(bench: str, sample: dict) -> str:
    """The text shown to the model: the question for VQA (options are not shown, as in
    LLaVA-Med), the question with lettered options for multiple choice, the instruction for
    image tasks."""
    family = BENCHMARKS[bench].family
    if family == "image":
        return sample["instruction"]
    if family == "choice":
        return choice_prompt(sample["question"], sample["options"])
    return sample["question"]


def _batches(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _progress(total: int, initial: int, desc: str, enabled: bool):
    return tqdm(total=total, initial=initial, desc=desc, unit="sample", disable=not enabled,
                dynamic_ncols=True)


def _load(load_image, path):
    if path is None:
        return None
    try:
        return load_image(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None


def _pending(samples: list[dict], pred_path: Path) -> tuple[list[dict], dict[str, dict]]:
    repair_jsonl(pred_path)
    done = {r["id"]: r for r in read_predictions(pred_path)}
    return [s for s in samples if s["id"] not in done], done


def _append(pred_path: Path, rows: list[dict]) -> None:
    with open(pred_path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _in_order(samples: list[dict], rows: dict[str, dict], pred_path: Path) -> list[dict]:
    ids = {s["id"] for s in samples}
    stale = [k for k in rows if k not in ids]
    if stale:
        warnings.warn(f"{pred_path}: {len(stale)} rows belong to no sample of the data file "
                      f"(e.g. {stale[:3]}); they are not scored", stacklevel=3)
    return [rows[s["id"]] for s in samples if s["id"] in rows]


def run_text(bench: str, samples: list[dict], answer_batch: AnswerBatch, out_dir,
             batch_size: int = 8, load_image: Callable | None = None,
             progress: bool = True) -> list[dict]:
    """Answer every pending sample; returns all rows (old and new) in sample order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pred_path = out_dir / PREDICTIONS
    todo, done = _pending(samples, pred_path)
    load_image = load_image or default_image_loader()
    with _progress(len(samples), len(samples) - len(todo), bench, progress) as bar:
        for batch in _batches(todo, max(1, batch_size)):
            images = [_load(load_image, s.get("image")) for s in batch]
            prompts = [prompt_for(bench, s) for s in batch]
            answers = list(answer_batch(images, prompts))
            if len(answers) != len(batch):
                raise RuntimeError(f"answer_batch returned {len(answers)} answers for {len(batch)} prompts")
            rows = []
            for s, prompt, ans in zip(batch, prompts, answers):
                row = {"id": s["id"], "question": s["question"], "answer": s["answer"],
                       "prediction": "" if ans is None else str(ans),
                       "answer_type": s["answer_type"], "prompt": prompt, "image": s.get("image")}
                for k in ("options", "modality"):
                    if s.get(k) is not None:
                        row[k] = s[k]
                rows.append(row)
            _append(pred_path, rows)
            done.update((r["id"], r) for r in rows)
            bar.update(len(batch))
    return _in_order(samples, done, pred_path)


def run_image(bench: str, samples: list[dict], generate_batch: GenerateBatch, out_dir,
              batch_size: int = 4, load_image: Callable | None = None,
              progress: bool = True) -> list[dict]:
    """Generate an image for every pending sample; returns all rows in sample order."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    pred_path = out_dir / PREDICTIONS
    todo, done = _pending(samples, pred_path)
    load_image = load_image or default_image_loader()
    with _progress(len(samples), len(samples) - len(todo), bench, progress) as bar:
        for batch in _batches(todo, max(1, batch_size)):
            images = [_load(load_image, s["image"]) for s in batch]
            prompts = [prompt_for(bench, s) for s in batch]
            outs = list(generate_batch(images, prompts))
            if len(outs) != len(batch):
                raise RuntimeError(f"generate_batch returned {len(outs)} images for {len(batch)} inputs")
            rows = []
            for s, img in zip(batch, outs):
                rel = f"images/{safe_name(s['id'])}.png"
                img.save(out_dir / rel)
                rows.append({"id": s["id"], "image": s["image"], "target": s["target"],
                             "instruction": s["instruction"], "task": s["task"], "prediction": rel})
            _append(pred_path, rows)
            done.update((r["id"], r) for r in rows)
            bar.update(len(batch))
    return _in_order(samples, done, pred_path)
