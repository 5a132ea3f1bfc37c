"""Public datasets -> the training format (``healthgpt.data.format``).

Comprehension (question answering), images referenced in place (paths relative to the output file):

- ``vqa_rad``: the OSF release: ``VQA_RAD Dataset Public.json`` (rows with ``qid``,
  ``image_name``, ``question``, ``answer``, ``answer_type`` CLOSED/OPEN, ``phrase_type``...) and
  ``VQA_RAD Image Folder/<image_name>``. Split by ``phrase_type``: ``test_freeform`` /
  ``test_para`` rows are the test split, all others train.
- ``slake``: SLAKE 1.0: ``{train,validate,test}.json`` (rows with ``qid``, ``img_name`` like
  ``xmlab102/source.jpg``, ``question``, ``answer``, ``answer_type``, ``q_lang`` en/zh,
  ``modality``...) and ``imgs/<img_name>``. English rows only unless ``lang`` says otherwise.
- ``pathvqa``: the authors' release (``pvqa/``): ``qas/<split>/<split>_qa.pkl`` (a pickled list of
  ``{"image": "train_0422", "question": ..., "answer": ...}``) and ``images/<split>/<image>.jpg``;
  ``qas/<split>.json``/``.jsonl`` with the same keys is read too. Pickles are opened with an
  unpickler that only builds plain lists, dicts, strings and numbers (never arbitrary objects).

Generation, PNG slices written next to the output file (``images/...``), all 256 x 256:

- ``synthrad``: SynthRAD2023 Task 1: ``Task1/{brain,pelvis}/<patient>/{ct,mr,mask}.nii.gz``
  -> CT -> MRI and MRI -> CT slice pairs (axial slices whose body mask covers at least
  ``min_mask`` of the slice, every ``stride``-th). CT is windowed (``ct_window`` centre/width in
  HU, DICOM's linear window), MR scaled by its 0.5 / 99.5 percentiles inside the mask; outside the mask is set to 0.
- ``ixi``: IXI: ``IXI-T1/IXI002-Guys-0828-T1.nii.gz`` (also ``IXI-T2``, ``IXI-PD``...) ->
  super-resolution pairs: the target is the slice (percentile-scaled), the input the same slice
  area-downsampled by ``factor`` and bicubic-upsampled back (so input and target share a grid).

Every converter returns a ``ConvertReport``; a row whose image is missing (or a volume that
cannot be read) raises ``DataError`` naming it, or is skipped and counted with ``skip_bad``.
"""

from __future__ import annotations

import glob
import os
import pickle
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from healthgpt.constants import IMAGE_PLACEHOLDER
from healthgpt.data import imaging
from healthgpt.data.images import intensity_unit, read_volume, take_slice, to_uint8
from healthgpt.data.format import DataError, read_rows, write_rows

__all__ = [
    "ConvertReport",
    "convert_vqa_rad",
    "convert_slake",
    "convert_pathvqa",
    "convert_synthrad",
    "convert_ixi",
    "CONVERTERS",
    "GEN_SIZE",
    "merge_files",
]

GEN_SIZE = 256  # the VQ image tokenizer's input size
YES_NO = {"yes", "no"}


@dataclass
class ConvertReport:
    dataset: str
    output: str
    written: int = 0
    by_task: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)

    def skip(self, reason: str, message: str, skip_bad: bool) -> None:
        if not skip_bad:
            raise DataError(message + ". Pass skip_bad=True (--skip-bad) to drop such rows.")
        self.skipped[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(message)

    def summary(self) -> str:
        s = f"{self.dataset}: wrote {self.written} rows ({', '.join(f'{n} {t}' for t, n in sorted(self.by_task.items()))}) to {self.output}"
        if self.skipped:
            s += f"; skipped {sum(self.skipped.values())} (" + ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items())) + ")"
        return s


def _rel(path: str, out_json: str) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.dirname(os.path.abspath(out_json)))


def _qa_row(rid, image, question, answer, out_json, **extra) -> dict:
    row = {
        "id": rid,
        "image": _rel(image, out_json),
        "conversations": [
            {"from": "human", "value": IMAGE_PLACEHOLDER + "\n" + str(question).strip()},
            {"from": "gpt", "value": str(answer).strip()},
        ],
        "task": "comp",
    }
    row.update({k: v for k, v in extra.items() if v is not None})
    return row


def _answer_type(raw, answer) -> str:
    if isinstance(raw, str) and raw.strip().upper() in ("CLOSED", "OPEN"):
        return raw.strip().lower()
    return "closed" if str(answer).strip().lower() in YES_NO else "open"


def _finish(report: ConvertReport, rows: list, out_json: str) -> ConvertReport:
    if not rows:
        raise DataError(f"{report.dataset}: no rows converted ({report.summary()})")
    write_rows(rows, out_json)
    report.written = len(rows)
    report.by_task.update(r["task"] for r in rows)
    return report


def _find_file(root: str, names: list, what: str) -> str:
    if os.path.isfile(root):
        return root
    for n in names:
        cand = os.path.join(root, n)
        if os.path.isfile(cand):
            return cand
    raise DataError(f"{what}: none of {names} found under {root}")


# ---- comprehension ----------------------------------------------------------------------------------


def convert_vqa_rad(root: str, out_json: str, *, split: str = "train", skip_bad: bool = False) -> ConvertReport:
    """VQA-RAD (OSF layout) -> comp rows. ``split``: ``train``, ``test`` or ``all``."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"VQA-RAD split must be train, test or all, got {split!r}")
    ann = _find_file(root, ["VQA_RAD Dataset Public.json", "VQA_RAD_Dataset_Public.json"], "VQA-RAD")
    base = os.path.dirname(ann)
    image_dirs = [os.path.join(base, "VQA_RAD Image Folder"), os.path.join(base, "VQA_RAD_Image_Folder"), base]
    report = ConvertReport("vqa-rad", out_json)
    rows = []
    for n, r in enumerate(read_rows(ann)):
        where = f"{ann}: row {n} (qid {r.get('qid')!r})" if isinstance(r, dict) else f"{ann}: row {n}"
        if not isinstance(r, dict) or not all(k in r for k in ("image_name", "question", "answer")):
            report.skip("malformed", f"{where}: needs image_name, question and answer", skip_bad)
            continue
        is_test = str(r.get("phrase_type", "")).startswith("test")
        if (split == "train" and is_test) or (split == "test" and not is_test):
            continue
        image = next((os.path.join(d, r["image_name"]) for d in image_dirs if os.path.isfile(os.path.join(d, r["image_name"]))), None)
        if image is None:
            report.skip("missing image", f"{where}: image {r['image_name']!r} not found in {image_dirs[0]}", skip_bad)
            continue
        rows.append(_qa_row(f"vqarad-{r.get('qid', n)}", image, r["question"], r["answer"], out_json,
                            answer_type=_answer_type(r.get("answer_type"), r["answer"]), dataset="vqa-rad",
                            organ=r.get("image_organ")))
    return _finish(report, rows, out_json)


def convert_slake(root: str, out_json: str, *, split: str = "train", lang: str | None = "en", skip_bad: bool = False) -> ConvertReport:
    """SLAKE 1.0 -> comp rows. ``split``: ``train``, ``validate`` (or ``val``) or ``test``;
    ``lang``: keep rows whose ``q_lang`` is this (``None``: all)."""
    split = {"val": "validate", "validation": "validate"}.get(split, split)
    ann = _find_file(root, [f"{split}.json"], "SLAKE")
    base = os.path.dirname(ann)
    report = ConvertReport("slake", out_json)
    rows = []
    for n, r in enumerate(read_rows(ann)):
        where = f"{ann}: row {n} (qid {r.get('qid')!r})" if isinstance(r, dict) else f"{ann}: row {n}"
        if not isinstance(r, dict) or not all(k in r for k in ("img_name", "question", "answer")):
            report.skip("malformed", f"{where}: needs img_name, question and answer", skip_bad)
            continue
        if lang is not None and r.get("q_lang", "en") != lang:
            continue
        image = os.path.join(base, "imgs", r["img_name"])
        if not os.path.isfile(image):
            report.skip("missing image", f"{where}: image {r['img_name']!r} not found in {os.path.join(base, 'imgs')}", skip_bad)
            continue
        rows.append(_qa_row(f"slake-{r.get('qid', n)}", image, r["question"], r["answer"], out_json,
                            answer_type=_answer_type(r.get("answer_type"), r["answer"]), dataset="slake",
                            modality=r.get("modality"), lang=r.get("q_lang")))
    return _finish(report, rows, out_json)


class _PlainUnpickler(pickle.Unpickler):
    """Builds only what pickle's own opcodes build (lists, dicts, tuples, str, numbers, None)."""

    def find_class(self, module, name):
        raise DataError(f"refusing to unpickle {module}.{name}: the PathVQA .pkl files hold plain lists of dicts")


def _pathvqa_rows(qas: str, split: str) -> tuple:
    for name in (f"{split}_qa.pkl", f"{split}/{split}_qa.pkl", f"{split}_vqa.pkl", f"{split}/{split}_vqa.pkl"):
        path = os.path.join(qas, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                data = _PlainUnpickler(f).load()
            break
    else:
        for name in (f"{split}.json", f"{split}.jsonl"):
            path = os.path.join(qas, name)
            if os.path.isfile(path):
                data = read_rows(path)
                break
        else:
            raise DataError(f"PathVQA: no {split}_qa.pkl or {split}.json under {qas}")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of question rows, got {type(data).__name__}")
    return data, path


def convert_pathvqa(root: str, out_json: str, *, split: str = "train", skip_bad: bool = False) -> ConvertReport:
    """PathVQA (``pvqa/`` layout) -> comp rows. ``split``: ``train``, ``val`` or ``test``."""
    base = root if os.path.isdir(os.path.join(root, "qas")) else os.path.join(root, "pvqa")
    data, ann = _pathvqa_rows(os.path.join(base, "qas"), split)
    image_dir = os.path.join(base, "images", split)
    report = ConvertReport("pathvqa", out_json)
    rows = []
    for n, r in enumerate(data):
        where = f"{ann}: row {n}"
        if isinstance(r, dict) and "img_id" in r and "sent" in r:  # LXMERT-style *_vqa.pkl
            label = r.get("label") or {}
            r = {"image": r["img_id"], "question": r["sent"], "answer": max(label, key=label.get) if label else None}
        if not isinstance(r, dict) or not r.get("image") or r.get("question") is None or r.get("answer") is None:
            report.skip("malformed", f"{where}: needs image, question and answer", skip_bad)
            continue
        name = str(r["image"])
        cands = [os.path.join(image_dir, name)] if os.path.splitext(name)[1] else [os.path.join(image_dir, name + e) for e in (".jpg", ".png", ".jpeg")]
        image = next((c for c in cands if os.path.isfile(c)), None)
        if image is None:
            report.skip("missing image", f"{where} (image {name!r}): not found in {image_dir}", skip_bad)
            continue
        rows.append(_qa_row(f"pathvqa-{split}-{n}", image, r["question"], r["answer"], out_json,
                            answer_type=_answer_type(None, r["answer"]), dataset="pathvqa"))
    return _finish(report, rows, out_json)


# ---- generation -------------------------------------------------------------------------------------

CT_TO_MR = "Convert this CT slice into the corresponding MRI slice."
MR_TO_CT = "Convert this MRI slice into the corresponding CT slice."
SUPER_RES = "Reconstruct this low-resolution {modality} slice at high resolution."


def _gen_row(rid, image, target, instruction, out_json, **extra) -> dict:
    row = {
        "id": rid,
        "image": _rel(image, out_json),
        "conversations": [{"from": "human", "value": IMAGE_PLACEHOLDER + "\n" + instruction}],
        "task": "gen",
        "target_image": _rel(target, out_json),
    }
    row.update({k: v for k, v in extra.items() if v is not None})
    return row


def _pick_slices(mask_fraction: np.ndarray, min_fraction: float, stride: int, max_slices: int | None) -> list:
    zs = [int(z) for z in np.flatnonzero(mask_fraction >= min_fraction)]
    zs = zs[::max(1, stride)]
    if max_slices is not None and len(zs) > max_slices:
        idx = np.linspace(0, len(zs) - 1, max_slices).round().astype(int)
        zs = [zs[i] for i in idx]
    return zs


def convert_synthrad(
    root: str,
    out_json: str,
    *,
    regions: tuple = ("brain", "pelvis"),
    direction: str = "both",
    ct_window: tuple | None = None,
    min_mask: float = 0.15,
    stride: int = 4,
    max_slices: int | None = None,
    size: int = GEN_SIZE,
    skip_bad: bool = False,
) -> ConvertReport:
    """SynthRAD2023 Task 1 -> gen rows (PNG slice pairs under ``images/synthrad/``, ``size`` square).

    ``direction``: ``ct2mr``, ``mr2ct`` or ``both``. ``ct_window``: (centre, width) in HU for every
    region, the DICOM LINEAR window ``load_image`` applies (``healthgpt.data.images``); by default
    each region's ``DEFAULT_CT_WINDOWS`` entry.
    """
    if direction not in ("ct2mr", "mr2ct", "both"):
        raise ValueError(f"direction must be ct2mr, mr2ct or both, got {direction!r}")
    task1 = os.path.join(root, "Task1") if os.path.isdir(os.path.join(root, "Task1")) else root
    out_dir = os.path.join(os.path.dirname(os.path.abspath(out_json)), "images", "synthrad")
    report = ConvertReport("synthrad2023", out_json)
    rows = []
    found_region = False
    for region in regions:
        region_dir = os.path.join(task1, region)
        if not os.path.isdir(region_dir):
            continue
        found_region = True
        window = ct_window or DEFAULT_CT_WINDOWS.get(region, (40, 400))
        for patient in sorted(os.listdir(region_dir)):
            pdir = os.path.join(region_dir, patient)
            if not os.path.isdir(pdir):
                continue
            paths = {k: _first_existing(pdir, k) for k in ("ct", "mr", "mask")}
            missing = [k for k in ("ct", "mr") if paths[k] is None]
            if missing:
                report.skip("missing volume", f"SynthRAD {region}/{patient}: no {' or '.join(m + '.nii.gz' for m in missing)} in {pdir}", skip_bad)
                continue
            try:
                ct = read_volume(paths["ct"])
                mr = read_volume(paths["mr"])
                mask = read_volume(paths["mask"]) > 0.5 if paths["mask"] else np.ones(ct.shape, bool)
            except Exception as e:  # unreadable NIfTI
                report.skip("unreadable volume", f"SynthRAD {region}/{patient}: cannot read ({e})", skip_bad)
                continue
            if not (ct.shape == mr.shape == mask.shape):
                report.skip("shape mismatch", f"SynthRAD {region}/{patient}: ct {ct.shape}, mr {mr.shape}, mask {mask.shape} differ", skip_bad)
                continue
            mr_unit = imaging.percentile_normalise(mr, mask=mask)
            for z in _pick_slices(mask.mean(axis=(0, 1)), min_mask, stride, max_slices):
                m = take_slice(mask, z)
                ct_unit = intensity_unit(take_slice(ct, z), window)
                ct_png = imaging.save_png(to_uint8(imaging.square_unit(ct_unit * m, size)),
                                          os.path.join(out_dir, region, patient, f"ct_{z:03d}.png"))
                mr_png = imaging.save_png(to_uint8(imaging.square_unit(take_slice(mr_unit, z) * m, size)),
                                          os.path.join(out_dir, region, patient, f"mr_{z:03d}.png"))
                rid = f"synthrad-{region}-{patient}-z{z:03d}"
                if direction in ("ct2mr", "both"):
                    rows.append(_gen_row(rid + "-ct2mr", ct_png, mr_png, CT_TO_MR, out_json, dataset="synthrad2023",
                                         subtask=f"CT to MRI ({region})"))
                if direction in ("mr2ct", "both"):
                    rows.append(_gen_row(rid + "-mr2ct", mr_png, ct_png, MR_TO_CT, out_json, dataset="synthrad2023",
                                         subtask=f"MRI to CT ({region})"))
    if not found_region:
        raise DataError(f"SynthRAD2023: none of {list(regions)} under {task1} (expected Task1/<region>/<patient>/ct.nii.gz)")
    return _finish(report, rows, out_json)


DEFAULT_CT_WINDOWS = {"brain": (40, 400), "pelvis": (40, 400)}
"""(centre, width) in HU per SynthRAD region: a soft-tissue window that still shows bone edges."""


def _first_existing(folder: str, stem: str):
    for ext in (".nii.gz", ".nii"):
        p = os.path.join(folder, stem + ext)
        if os.path.isfile(p):
            return p
    return None


_IXI_NAME = re.compile(r"^(IXI\d+)-([A-Za-z]+)-(\d+)-([A-Za-z0-9]+)\.nii(\.gz)?$")


def convert_ixi(
    root: str,
    out_json: str,
    *,
    modalities: tuple = ("T1", "T2", "PD"),
    factor: int = 4,
    min_signal: float = 0.1,
    stride: int = 8,
    max_slices: int | None = None,
    skip_bad: bool = False,
) -> ConvertReport:
    """IXI -> super-resolution gen rows (PNG pairs under ``images/ixi/``).

    Reads ``IXI-<MOD>/IXI<nnn>-<site>-<nnnn>-<MOD>.nii.gz``; keeps axial slices whose fraction of
    voxels above ``min_signal`` (after percentile scaling) is at least ``min_signal``.
    """
    out_dir = os.path.join(os.path.dirname(os.path.abspath(out_json)), "images", "ixi")
    report = ConvertReport("ixi", out_json)
    rows = []
    files = []
    for mod in modalities:
        files += sorted(glob.glob(os.path.join(root, f"IXI-{mod}", "*.nii*")))
    if not files:
        raise DataError(f"IXI: no volumes under {root} (expected IXI-T1/IXI002-Guys-0828-T1.nii.gz and so on)")
    for path in files:
        m = _IXI_NAME.match(os.path.basename(path))
        if m is None:
            report.skip("unrecognised name", f"IXI: {path} does not look like IXI<nnn>-<site>-<nnnn>-<modality>.nii.gz", skip_bad)
            continue
        subject, mod = m.group(1), m.group(4)
        try:
            vol = read_volume(path)
        except Exception as e:
            report.skip("unreadable volume", f"IXI: cannot read {path} ({e})", skip_bad)
            continue
        unit = imaging.percentile_normalise(vol)
        zs = _pick_slices((unit > min_signal).mean(axis=(0, 1)), min_signal, stride, max_slices)
        for z in zs:
            hr = imaging.square_unit(take_slice(unit, z), GEN_SIZE)
            lr = imaging.degrade(hr, factor).clip(0.0, 1.0)
            stem = os.path.join(out_dir, mod, subject)
            hr_png = imaging.save_png(to_uint8(hr), os.path.join(stem, f"hr_{z:03d}.png"))
            lr_png = imaging.save_png(to_uint8(lr), os.path.join(stem, f"lr{factor}x_{z:03d}.png"))
            rows.append(_gen_row(f"ixi-{subject}-{mod}-z{z:03d}-sr{factor}", lr_png, hr_png,
                                 SUPER_RES.format(modality=f"{mod} MRI"), out_json, dataset="ixi",
                                 subtask=f"super-resolution x{factor} ({mod})"))
    return _finish(report, rows, out_json)


CONVERTERS = {
    "vqa-rad": convert_vqa_rad,
    "slake": convert_slake,
    "pathvqa": convert_pathvqa,
    "synthrad2023": convert_synthrad,
    "ixi": convert_ixi,
}


def merge_files(inputs: list, out_json: str) -> str:
    """Concatenate training files into one (image paths rewritten relative to ``out_json``)."""
    rows = []
    for path in inputs:
        base = os.path.dirname(os.path.abspath(path))
        for r in read_rows(path):
            r = dict(r)
            for key in ("image", "target_image"):
                if isinstance(r.get(key), str) and not os.path.isabs(r[key]):
                    r[key] = _rel(os.path.join(base, r[key]), out_json)
            rows.append(r)
    return write_rows(rows, out_json)
