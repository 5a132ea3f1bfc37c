"""The training-file format: LLaVA-style JSON rows plus a ``task``.

A training file is JSON (a list of rows, or an object holding one such list under ``data``/
``rows``/``samples``) or JSON Lines (``.jsonl``, one row a line). A row::

    {"id": "vqarad-12",                        # optional, defaults to the row's position
     "image": "images/synpic100.jpg",          # input image; relative to the file's folder
     "conversations": [{"from": "human", "value": "<image>\\nIs there a fracture?"},
                       {"from": "gpt",   "value": "no"}],
     "task": "comp"}                           # "comp" (default) or "gen"

    {"id": "synthrad-brain-1BA001-z060",
     "image": "images/ct_060.png",
     "conversations": [{"from": "human", "value": "<image>\\nConvert this CT slice to an MRI slice."}],
     "task": "gen",
     "target_image": "images/mr_060.png"}      # its VQ ids become the answer

Rules (``validate_row``):

- ``image`` is required, must exist and must decode with the model's image loader
  (``healthgpt.data.images.load_image``: PNG/JPEG/BMP/TIFF, DICOM, NIfTI) within its size limit
  (``check_images``: what ``load_samples`` validated, training can read). Relative paths are
  tried against ``image_folder`` (if given), then the data file's folder; absolute paths and
  paths leading outside the data folder are accepted (README, "Input policy").
- ``conversations`` alternate ``human`` and ``gpt`` turns (``user``/``assistant`` accepted),
  starting with ``human``; no human turn is empty. ``<image>`` is put in front of the first
  human turn if no turn has it; more than one ``<image>`` is an error (one image per row).
- ``comp`` rows need at least one ``gpt`` turn with text; every gpt turn is a training target.
- ``gen`` rows need ``target_image`` (existing) and one human turn; an optional final ``gpt`` turn
  is ignored (the answer is the target image's VQ ids framed by ``<start_index>`` ..
  ``<end_index>``).
- ``task`` must be ``comp`` or ``gen`` (``com``, ``comprehension`` and ``generation`` are
  accepted spellings).

A file that is not UTF-8 names the byte offset; a broken JSON document names the line and column.
A bad row raises ``DataError`` naming the file, the row's position and id, and the problem; with
``skip_bad=True`` bad rows are dropped instead and ``LoadReport`` counts them by reason.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field

from hlora.files import atomic_write

from healthgpt.constants import IMAGE_PLACEHOLDER, TASKS
from healthgpt.data.images import ImageLoadError, load_image

__all__ = [
    "DataError",
    "Sample",
    "LoadReport",
    "read_rows",
    "load_samples",
    "validate_row",
    "write_rows",
]

_TASK_ALIASES = {"comp": "comp", "com": "comp", "comprehension": "comp", "gen": "gen", "generation": "gen"}
_ROLE_ALIASES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


class DataError(ValueError):
    """A training row (or file) that cannot be used; the message names the file and the row."""


@dataclass
class Sample:
    """One validated row: absolute paths, normalised roles, the task."""

    id: str
    task: str
    image: str
    conversations: list  # [{"from": "human"|"gpt", "value": str}], <image> in the first human turn
    target_image: str | None = None
    source: str = ""  # "FILE:ROW" for messages

    def to_row(self) -> dict:
        row = {"id": self.id, "task": self.task, "image": self.image, "conversations": self.conversations}
        if self.target_image is not None:
            row["target_image"] = self.target_image
        return row


@dataclass
class LoadReport:
    """What ``load_samples`` kept and dropped."""

    path: str
    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    filtered: Counter = field(default_factory=Counter)  # task -> rows left out by the task filter
    examples: list = field(default_factory=list)  # first few skip messages

    def summary(self) -> str:
        parts = [f"{self.kept} of {self.total} rows from {self.path}"]
        if self.skipped:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items()))
            parts.append(f"skipped {sum(self.skipped.values())} bad ({reasons})")
        if self.filtered:
            parts.append("left out " + ", ".join(f"{n} {t}" for t, n in sorted(self.filtered.items())) + " rows of the other task")
        return "; ".join(parts)


def read_rows(path: str | os.PathLike) -> list:
    """The raw rows of a JSON or JSON Lines file (no validation). JSON may hold a list of rows, an
    object with one list of rows (``data``, ``rows`` or ``samples`` first), or an object of
    id -> row; a ``.json`` file that is not one JSON document is read as JSON Lines."""
    path = str(path)
    if not os.path.isfile(path):
        raise DataError(f"data file {path} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: not UTF-8 text: byte {e.start} (line {line}) is {raw[e.start:e.start + 1]!r} "
                        f"({e.reason}); re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    data, error = None, None
    if not path.endswith(".jsonl"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            error = e  # maybe JSON Lines under a .json name
    if data is None:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    if error is not None and not rows:  # not JSON Lines either: one broken JSON document
                        raise DataError(f"{path}: is not JSON: {error.msg} at line {error.lineno}, "
                                        f"column {error.colno} (char {error.pos})") from None
                    raise DataError(f"{path}: line {n} is not JSON: {e.msg} at column {e.colno}") from None
        return rows
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        for key in ("data", "rows", "samples"):
            if isinstance(data.get(key), list):
                return data[key]
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            return lists[0]
        if data and all(isinstance(v, dict) for v in data.values()):
            return [{"id": k, **v} for k, v in data.items()]
        raise DataError(f"{path}: expected a list of rows (or an object with a 'data' list), got an object with keys {sorted(data)[:8]}")
    raise DataError(f"{path}: expected a list of rows, got {type(data).__name__}")


def write_rows(rows: list, path: str | os.PathLike) -> str:
    """Write rows as pretty JSON (``.json``) or JSON Lines (``.jsonl``), atomically."""
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".jsonl"):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        text = json.dumps(rows, ensure_ascii=False, indent=1) + "\n"
    atomic_write(path, text)
    return path


class _Bad(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def _resolve(value, roots: list, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Bad(f"missing {what}", f"no '{what}' (a path to the {'target ' if what == 'target_image' else ''}image)")
    if os.path.isabs(value):
        if os.path.isfile(value):
            return value
        raise _Bad(f"missing {what}", f"{what} {value!r} not found")
    tried = []
    for root in roots:
        cand = os.path.normpath(os.path.join(root, value))
        if os.path.isfile(cand):
            return os.path.abspath(cand)
        tried.append(cand)
    raise _Bad(f"missing {what}", f"{what} {value!r} not found (looked for {', '.join(tried)})")


def validate_row(row, roots: list) -> Sample:
    """Check one row (see the module doc); raises ``_Bad`` (reason, message) on a problem."""
    if not isinstance(row, dict):
        raise _Bad("not an object", f"row is a {type(row).__name__}, not an object")
    raw_task = row.get("task", "comp")
    task = _TASK_ALIASES.get(str(raw_task).strip().lower()) if isinstance(raw_task, str) else None
    if task is None:
        raise _Bad("unknown task", f"unknown task {raw_task!r} (expected one of {list(TASKS)})")
    image = _resolve(row.get("image"), roots, "image")
    conv = row.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise _Bad("no conversations", "no 'conversations' list")
    turns = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise _Bad("bad turn", f"conversation turn {i} needs 'from' and 'value'")
        role = _ROLE_ALIASES.get(str(turn["from"]).lower())
        if role is None:
            raise _Bad("bad turn", f"conversation turn {i} is from {turn['from']!r} (expected human or gpt)")
        if not isinstance(turn["value"], str):
            raise _Bad("bad turn", f"conversation turn {i} value is not text")
        expected = "human" if i % 2 == 0 else "gpt"
        if role != expected:
            raise _Bad("bad turn", f"conversation turn {i} is from {role}; turns must alternate human, gpt, ... starting with human")
        turns.append({"from": role, "value": turn["value"]})
    for i, t in enumerate(turns):
        if t["from"] == "human" and not t["value"].replace(IMAGE_PLACEHOLDER, "").strip():
            raise _Bad("empty question", f"conversation turn {i} (human) is empty")
    n_image = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
    if n_image > 1:
        raise _Bad("several <image>", f"{n_image} '{IMAGE_PLACEHOLDER}' placeholders; a row holds one image")
    if n_image == 1 and IMAGE_PLACEHOLDER not in turns[0]["value"]:
        raise _Bad("bad turn", f"'{IMAGE_PLACEHOLDER}' must be in the first human turn")
    if n_image == 0:
        turns[0] = {"from": "human", "value": IMAGE_PLACEHOLDER + "\n" + turns[0]["value"]}
    target = None
    if task == "comp":
        if not any(t["from"] == "gpt" and t["value"].strip() for t in turns):
            raise _Bad("no assistant turn", "no assistant ('gpt') turn with an answer")
        if row.get("target_image"):
            raise _Bad("target on comp row", "a 'comp' row has a 'target_image' (did you mean task 'gen'?)")
    else:
        target = _resolve(row.get("target_image"), roots, "target_image")
        humans = [t for t in turns if t["from"] == "human"]
        if len(humans) != 1:
            raise _Bad("bad turn", f"a 'gen' row takes one human turn (the instruction), got {len(humans)}")
        turns = turns[:1]
    rid = row.get("id", row.get("qid"))
    return Sample(id="" if rid is None else str(rid), task=task, image=image, conversations=turns, target_image=target)


def _check_readable(sample: Sample, verdicts: dict) -> None:
    """Decode the row's images with the one reader training uses (each file once per load)."""
    for what, image in (("image", sample.image), ("target_image", sample.target_image)):
        if image is None:
            continue
        if image not in verdicts:
            try:
                load_image(image)
                verdicts[image] = None
            except ImageLoadError as e:
                verdicts[image] = str(e)
        if verdicts[image] is not None:
            raise _Bad(f"unreadable {what}", f"{what} cannot be read: {verdicts[image]}")


def load_samples(
    path: str | os.PathLike,
    *,
    image_folder: str | None = None,
    skip_bad: bool = False,
    task: str | None = None,
    check_images: bool = True,
) -> tuple:
    """Read and validate a training file: ``(samples, LoadReport)``. The one validator: ``healthgpt
    data check`` and ``train`` both call it, so a file one accepts the other accepts.

    ``task`` (``comp``/``gen``) keeps only that task's rows (``None`` or ``mixed``: all).
    ``skip_bad``: drop bad rows and count them instead of raising ``DataError``.
    ``check_images``: decode every distinct image once with ``load_image`` (an unreadable image is a
    bad row, reason ``unreadable image``) instead of failing mid-training.
    """
    path = str(path)
    if task not in (None, "mixed", *TASKS):
        raise ValueError(f"task filter must be comp, gen or mixed, got {task!r}")
    rows = read_rows(path)
    roots = ([image_folder] if image_folder else []) + [os.path.dirname(os.path.abspath(path))]
    report = LoadReport(path=path, total=len(rows))
    samples, seen, verdicts = [], {}, {}
    for n, row in enumerate(rows):
        rid = row.get("id", row.get("qid")) if isinstance(row, dict) else None
        where = f"{path}: row {n}" + (f" (id {rid!r})" if rid is not None else "")
        try:
            s = validate_row(row, roots)
            if check_images:
                _check_readable(s, verdicts)
        except _Bad as bad:
            if not skip_bad:
                raise DataError(f"{where}: {bad.message}. Fix the row, or pass --skip-bad to drop bad rows.") from None
            report.skipped[bad.reason] += 1
            if len(report.examples) < 5:
                report.examples.append(f"{where}: {bad.message}")
            continue
        if not s.id:
            s.id = str(n)
        if s.id in seen:
            s.id = f"{s.id}#{n}"
        seen[s.id] = n
        s.source = f"{path}:{n}"
        if task in TASKS and s.task != task:
            report.filtered[s.task] += 1
            continue
        samples.append(s)
    report.kept = len(samples)
    if not samples:
        raise DataError(f"{path}: no usable rows ({report.summary()})")
    return samples, report
