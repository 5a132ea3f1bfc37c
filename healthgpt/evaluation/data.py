"""Benchmarks and their input files.

Benchmark names (``BENCHMARKS``): ``vqa-rad``, ``slake``, ``pathvqa`` (family ``vqa``);
``omnimedvqa``, ``mmmu-med`` (family ``choice``); ``modality-conversion``,
``super-resolution``, ``reconstruction`` (family ``image``).

Input files are JSON Lines (``.jsonl``, one object a line) or JSON (``.json``: a list of
objects, an object holding one such list, or an object of objects keyed by id). Relative image
paths are resolved against the data file's folder, then its ``imgs/``, ``images/`` and
``VQA_RAD Image Folder/`` subfolders (SLAKE's and VQA-RAD's public layouts); the first that
exists wins. ``id`` defaults to the row's position. Ids must be unique.

**vqa** (VQA-RAD, SLAKE, PathVQA)::

    {"id": "q1", "image": "imgs/x.jpg", "question": "Is there a fracture?", "answer": "no",
     "answer_type": "closed", "options": ["yes", "no"]}

``answer_type`` is optional (``closed`` when the answer is a yes/no word, else ``open``);
``CLOSED``/``OPEN`` are accepted. ``options`` is optional (open questions with options are also
scored as multiple choice). Also read: ``qid``/``question_id`` for ``id``; ``img_name``/
``image_name``/``image_path`` for ``image`` (SLAKE, VQA-RAD); SLAKE's ``q_lang`` (rows whose
language differs from ``lang``, default ``en``, are dropped; ``lang=None`` keeps all).

**choice** (OmniMedVQA, MMMU-Med)::

    {"id": "m1", "image": "ct/1.png", "question": "Which organ is shown?",
     "option_A": "Liver", "option_B": "Lung", "option_C": "Brain", "option_D": "Heart",
     "gt_answer": "Lung", "modality": "CT"}

``options`` may replace ``option_A``..: a list, a ``{"A": ..}`` mapping, or MMMU's string
``"['a', 'b']"``. The answer (``gt_answer``, ``answer`` or ``label``) is a letter or an option's
text. ``modality`` (or OmniMedVQA's ``modality_type``) is optional; labels are mapped onto the
paper's Table 9 columns by ``normalise.canonical_modality``. MMMU's ``image_1`` is read when
``image`` is absent (only the first image is shown to the model).

**image** (modality conversion, super-resolution, reconstruction)::

    {"id": "s1", "image": "ct/1.dcm", "target": "mri/1.png",
     "instruction": "Convert this CT image to MRI.", "task": "CT to MRI (Brain)"}

``image`` is the model input (also ``input``/``source``), ``target`` the reference (also
``gt``/``target_image``). ``instruction`` is optional (``default_instruction``); ``task`` groups
the results into the table's column groups (default: the benchmark's name).
"""

from __future__ import annotations

import ast
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from healthgpt.data.format import DataError, read_rows
from healthgpt.evaluation.choice import LETTERS
from healthgpt.evaluation.vqa import answer_type_of

__all__ = ["Benchmark", "BENCHMARKS", "load_samples", "read_records", "resolve_path",
           "default_instruction", "parse_options"]


@dataclass(frozen=True)
class Benchmark:
    name: str
    family: str            # "vqa" | "choice" | "image"
    title: str             # column/table label as the paper prints it
    macro_over_modalities: bool = False


BENCHMARKS = {
    "vqa-rad": Benchmark("vqa-rad", "vqa", "VQA-RAD"),
    "slake": Benchmark("slake", "vqa", "SLAKE"),
    "pathvqa": Benchmark("pathvqa", "vqa", "PathVQA"),
    "omnimedvqa": Benchmark("omnimedvqa", "choice", "OMVQA", macro_over_modalities=True),
    "mmmu-med": Benchmark("mmmu-med", "choice", "MMMU-Med"),
    "modality-conversion": Benchmark("modality-conversion", "image", "Modality conversion"),
    "super-resolution": Benchmark("super-resolution", "image", "Super-resolution"),
    "reconstruction": Benchmark("reconstruction", "image", "Reconstruction"),
}

IMAGE_SUBFOLDERS = ("", "imgs", "images", "VQA_RAD Image Folder")


def read_records(path) -> list[dict]:
    """Rows of a ``.jsonl`` or ``.json`` file (layouts in the module docstring; the one reader
    ``healthgpt.data.read_rows`` parses it)."""
    return read_rows(path)


def resolve_path(p, base: Path) -> str | None:
    """Absolute path of image ``p`` (relative to ``base``; see the module docstring)."""
    if p is None or str(p).strip() == "":
        return None
    p = os.path.expanduser(str(p))
    if os.path.isabs(p):
        return p
    for sub in IMAGE_SUBFOLDERS:
        cand = base / sub / p
        if cand.exists():
            return str(cand.resolve())
    return str((base / p).resolve())


def _first(row: dict, *keys):
    for k in keys:
        v = row.get(k)
        if v is not None and not (isinstance(v, str) and v.strip() == ""):
            return v
    return None


def parse_options(row: dict) -> list[str] | None:
    """Options of a row: ``options`` (list, letter mapping, or string list) or ``option_A``.."""
    opts = row.get("options", row.get("choices"))
    if isinstance(opts, str):
        s = opts.strip()
        if s.startswith("["):
            try:
                opts = ast.literal_eval(s)
            except (ValueError, SyntaxError):
                opts = json.loads(s)
        else:
            raise ValueError(f"cannot read options {opts!r}")
    if isinstance(opts, dict):
        opts = [opts[k] for k in sorted(opts)]
    if isinstance(opts, (list, tuple)):
        return [str(o) for o in opts] if opts else None
    lettered = []
    for L in LETTERS:
        v = _first(row, f"option_{L}", f"option{L}")
        if v is None:
            if L == "A":
                return None
            break
        lettered.append(str(v))
    return lettered or None


def default_instruction(bench: str, task: str | None) -> str:
    """The prompt used for an image sample without ``instruction`` (a guess: the released model's
    exact training prompts are not public; give ``instruction`` in the data when you know them)."""
    if bench == "super-resolution":
        return "Reconstruct a high-resolution version of this image."
    if bench == "reconstruction":
        return "Reconstruct this image."
    m = re.search(r"\b(CT|MRI|MR)\b\s*(?:to|->|2)\s*\b(CT|MRI|MR)\b", task or "", re.I)
    if m:
        src, dst = (x.upper().replace("MR", "MRI").replace("MRII", "MRI") for x in m.groups())
        return f"Convert this {src} image into the corresponding {dst} image."
    return "Convert this image into the target modality."


def load_samples(bench: str, path, lang: str | None = "en", limit: int | None = None) -> list[dict]:
    """Normalised samples of benchmark ``bench`` from data file ``path``.

    vqa: ``{id, image, question, answer, answer_type, options?}``; choice: ``{id, image,
    question, options, answer, modality?}``; image: ``{id, image, target, instruction, task}``.
    """
    if bench not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {bench!r}; one of {sorted(BENCHMARKS)}")
    family = BENCHMARKS[bench].family
    path = Path(path)
    base = path.resolve().parent
    out, seen = [], set()
    for i, row in enumerate(read_records(path)):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i} is a {type(row).__name__}, not an object")
        if lang is not None and row.get("q_lang") not in (None, "") and row["q_lang"] != lang:
            continue
        sid = _first(row, "id", "qid", "question_id", "sample_id")
        sid = str(i if sid is None else sid)
        if sid in seen:
            raise DataError(f"{path}: row {i}: duplicate id {sid!r} (ids must be unique to resume)")
        seen.add(sid)
        image = resolve_path(_first(row, "image", "img_name", "image_name", "image_path",
                                    "input", "source", "input_image", "image_1"), base)
        if family == "image":
            target = resolve_path(_first(row, "target", "gt", "target_image", "output"), base)
            if image is None or target is None:
                raise DataError(f"{path}: row {sid!r} needs 'image' and 'target'")
            task = str(_first(row, "task") or bench)
            s = {"id": sid, "image": image, "target": target, "task": task,
                 "instruction": str(_first(row, "instruction", "prompt", "question")
                                    or default_instruction(bench, task))}
        else:
            question = _first(row, "question", "text", "query")
            answer = _first(row, "gt_answer", "answer", "label") if family == "choice" \
                else _first(row, "answer", "gt_answer", "label")
            if question is None or answer is None:
                raise DataError(f"{path}: row {sid!r} needs 'question' and an answer")
            if isinstance(question, (list, dict)) or isinstance(answer, (list, dict)):
                raise DataError(f"{path}: row {sid!r}: 'question' and the answer must be text, not lists or objects")
            s = {"id": sid, "image": image, "question": str(question), "answer": str(answer)}
            try:
                options = parse_options(row)
                if family == "vqa":
                    s["answer_type"] = answer_type_of(answer, _first(row, "answer_type"))
            except (ValueError, SyntaxError) as e:
                raise DataError(f"{path}: row {sid!r}: {e}") from None
            if family == "vqa":
                if options:
                    s["options"] = options
            else:
                if not options:
                    raise DataError(f"{path}: row {sid!r} has no options")
                s["options"] = options
                s["answer_type"] = "closed"
            modality = _first(row, "modality", "modality_type", "image_modality")
            if modality is not None:
                s["modality"] = str(modality)
        out.append(s)
        if limit is not None and len(out) >= limit:
            break
    return out
