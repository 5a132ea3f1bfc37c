"""Batched, resumable inference: samples in, one JSONL row per sample out.

The runner only needs two callables (so it is testable without a model):

- ``AnswerBatch(images, prompts) -> list[str]`` for the text benchmarks;
- ``GenerateBatch(images, instructions) -> list[PIL.Image]`` for the image benchmarks.

``images`` are whatever ``load_image(path)`` returns (default ``healthgpt.data.images.load_image``,
the reader training data and inference use); ``None`` for a sample without an image.

Output in ``out_dir``: ``predictions.jsonl``, appended and flushed (``fsync``) after every batch.
A rerun skips the ids already there (resume); a half-written last row left by a crash (no final
newline, or a last line that is not a whole JSON object) is reported and cut off first.

``read_predictions`` is strict about everything else (``PredictionsError``, one line naming the
file, the line and the row's id): a line that is not UTF-8 or not JSON, a row that is not an
object, a missing/None/non-text field, an unknown ``answer_type``, repeated ids (all named), an
empty file, and rows of the other benchmark family (text rows scored as an image benchmark or the
reverse). Image predictions are saved as ``images/<id>.png`` before their row is written.

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

from healthgpt.data.format import DataError
from healthgpt.data.images import load_image
from healthgpt.evaluation.choice import choice_prompt
from healthgpt.evaluation.data import BENCHMARKS
from healthgpt.evaluation.vqa import answer_type_of

__all__ = ["AnswerBatch", "GenerateBatch", "PredictionsError", "default_image_loader", "read_predictions",
           "repair_jsonl", "safe_name", "prompt_for", "run_text", "run_image", "PREDICTIONS"]

AnswerBatch = Callable[[Sequence, Sequence[str]], Sequence[str]]
GenerateBatch = Callable[[Sequence, Sequence[str]], Sequence]
PREDICTIONS = "predictions.jsonl"


def default_image_loader() -> Callable:
    """``healthgpt.data.images.load_image`` (PNG/JPEG/DICOM/NIfTI -> 8-bit RGB), the one reader."""
    return load_image


class PredictionsError(DataError):
    """A predictions file that cannot be resumed or scored; the message names the file and the row."""


# the fields a row of each family must carry as text (what the runner writes)
_TEXT_FIELDS = {"vqa": ("answer", "prediction"), "choice": ("answer", "prediction"), "image": ("prediction", "target")}


def _last_row_is_partial(data: bytes) -> bool:
    if not data.endswith(b"\n"):
        return True
    last = data[:-1].rsplit(b"\n", 1)[-1]
    if not last.strip():
        return False
    try:
        return not isinstance(json.loads(last.decode("utf-8")), dict)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return True


def repair_jsonl(path) -> int:
    """Cut a half-written last row from ``path`` (a trailing partial line, or a last line that is
    not a whole JSON object even if a newline follows it); returns the bytes removed."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data or not _last_row_is_partial(data):
        return 0
    keep = data.rstrip(b"\n").rfind(b"\n") + 1 if data.endswith(b"\n") else data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(keep)
    warnings.warn(f"{path}: removed a half-written last row ({len(data) - keep} bytes); it is predicted again",
                  stacklevel=2)
    return len(data) - keep


def _check_row(row, where: str, family: str | None, path: Path) -> dict:
    if not isinstance(row, dict):
        raise PredictionsError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    sid = row.get("id")
    if sid is None or isinstance(sid, (dict, list, bool)) or str(sid).strip() == "":
        raise PredictionsError(f"{where}: row without an 'id'")
    row["id"] = str(sid)
    where = f"{where} (id {row['id']!r})"
    if family is None:
        return row
    if family == "image" and "target" not in row and ("question" in row or "answer" in row):
        raise PredictionsError(f"{path} holds question/answer (VQA or multiple-choice) predictions, not "
                               f"image predictions; score it with its own text benchmark")
    if family != "image" and "target" in row and "answer" not in row:
        raise PredictionsError(f"{path} holds image predictions (target images), not answers to questions; "
                               f"score it with its own image benchmark")
    for key in _TEXT_FIELDS[family]:
        value = row.get(key)
        if not isinstance(value, str):
            what = "missing" if key not in row else "null" if value is None else f"a {type(value).__name__}, not text"
            raise PredictionsError(f"{where}: '{key}' is {what}")
    if family == "vqa":
        try:
            row["answer_type"] = answer_type_of(row["answer"], row.get("answer_type"))
        except ValueError as e:
            raise PredictionsError(f"{where}: {e}") from None
    options = row.get("options")
    if family == "choice" and not options:
        raise PredictionsError(f"{where}: a multiple-choice row needs 'options'")
    if options is not None and not (isinstance(options, list) and all(isinstance(o, str) for o in options)):
        raise PredictionsError(f"{where}: 'options' must be a list of strings")
    return row


def read_predictions(path, bench: str | None = None, allow_empty: bool = True) -> list[dict]:
    """Rows of a predictions JSONL file (module docstring): a half-written last row is skipped with
    a warning, anything else malformed raises ``PredictionsError``. ``bench``: check each row has
    that benchmark family's fields; ``allow_empty=False``: an empty file is an error too."""
    path = Path(path)
    if not path.exists():
        return []
    family = BENCHMARKS[bench].family if bench is not None else None
    data = path.read_bytes()
    partial = bool(data) and _last_row_is_partial(data)
    lines = data.splitlines()
    if partial:
        warnings.warn(f"{path}: skipping a half-written last row", stacklevel=2)
        lines = lines[:-1]
    rows: dict[str, dict] = {}
    repeated: dict[str, list] = {}
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{path}:{i}"
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise PredictionsError(f"{where}: not UTF-8 (byte {e.start} of the line is {raw[e.start:e.start + 1]!r})") from None
        except json.JSONDecodeError as e:
            raise PredictionsError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
        row = _check_row(row, where, family, path)
        if row["id"] in rows:
            repeated.setdefault(row["id"], [rows[row["id"]]["_line"]]).append(i)
        row["_line"] = i
        rows[row["id"]] = row
    if repeated:
        named = ", ".join(f"{k!r} (lines {', '.join(map(str, v))})" for k, v in list(repeated.items())[:10])
        more = f" and {len(repeated) - 10} more" if len(repeated) > 10 else ""
        raise PredictionsError(f"{path}: {len(repeated)} ids occur more than once: {named}{more}; "
                               f"each sample must have one prediction")
    if not rows and not allow_empty:
        raise PredictionsError(f"{path}: no predictions in the file")
    for row in rows.values():
        del row["_line"]
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
