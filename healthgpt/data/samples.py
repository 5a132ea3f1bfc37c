"""A small training set made from the real medical images that ship inside PyPI wheels.

Nothing is downloaded and no image is committed to the repository: ``build_sample_set()`` reads
the files below from the installed packages, writes PNGs and three training files into a cache
folder (``$HEALTHGPT_CACHE/samples/v<version>``, default ``~/.cache/healthgpt``), and returns
their paths. The output is deterministic (same packages, same bytes) and is built once.

Sources (reference.md section 6):

- pydicom's test files: ``J2K_pixelrep_mismatch.dcm`` (CT head 512 x 512), ``CT_small.dcm``
  (CT through a vertebra, 128 x 128), ``examples_overlay.dcm`` (MR abdomen with a marked liver
  lesion), ``MR_small.dcm`` (MR 64 x 64), ``examples_rgb_color.dcm`` (ultrasound of a lymph node).
- nibabel's test data: ``anatomical.nii`` (brain MR volume), ``example4d.nii.gz`` (brain EPI).
- scikit-image's data (used when scikit-image is installed): ``retina.jpg`` (fundus
  photograph), ``ihc.png`` (immunohistochemistry-stained tissue), ``microaneurysms.png``.

Files written:

- ``align.json`` (stage 1): ``comp`` captions ("Describe the image briefly.") and ``gen``
  reconstructions (the target image is the input image), like LLaVA-558k's two uses in stage 1.
- ``instruct.json`` (stage 3): ``comp`` questions with short answers (modality, body part,
  organ, yes/no) and ``gen`` pairs: super-resolution (input area-downsampled 4x and upsampled,
  target the slice) and CT -> MRI-style / MRI-style -> CT (see below).
- ``mixed.json`` (stage 2): both of the above.

The CT <-> MRI-style pairs are NOT real MRI: no wheel ships a registered CT/MRI pair, so the
"MRI-style" image is a deterministic contrast remapping of the real CT slice (bone and air dark,
fluid bright, soft tissue mid-grey, roughly a T2 look). It gives the modality-conversion task
real anatomy and a learnable mapping; real pairs come from ``convert_synthrad``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import nibabel
import numpy as np
import PIL
import pydicom
from pydicom.data import get_testdata_file

from healthgpt.constants import IMAGE_PLACEHOLDER
from healthgpt.data import imaging
from healthgpt.data.converters import GEN_SIZE
from healthgpt.data.images import DicomImage, intensity_unit, read_dicom, read_volume, take_slice, to_uint8
from healthgpt.data.format import write_rows

__all__ = ["SampleSet", "build_sample_set", "default_cache_dir", "SAMPLESET_VERSION"]

SAMPLESET_VERSION = 2  # 2: CT windows are DICOM's linear VOI window (healthgpt.data.images)
CT_HEAD_WINDOW = (40, 120)  # (centre, width) in HU: brain
CT_SPINE_WINDOW = (40, 400)  # soft tissue, bone edges visible


def default_cache_dir() -> str:
    """``$HEALTHGPT_CACHE`` or ``$XDG_CACHE_HOME/healthgpt`` or ``~/.cache/healthgpt``."""
    env = os.environ.get("HEALTHGPT_CACHE")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "healthgpt")


@dataclass
class SampleSet:
    root: str
    align: str  # stage 1 training file
    mixed: str  # stage 2
    instruct: str  # stage 3
    demo_image: str  # a real CT slice the demo asks about
    demo_question: str
    demo_answer: str
    demo_gen_image: str  # the input of the demo's generation request
    demo_gen_instruction: str

    @classmethod
    def at(cls, root: str) -> "SampleSet":
        with open(os.path.join(root, "manifest.json")) as f:
            m = json.load(f)
        j = lambda p: os.path.join(root, p)  # noqa: E731
        return cls(root=root, align=j("align.json"), mixed=j("mixed.json"), instruct=j("instruct.json"),
                   demo_image=j(m["demo"]["image"]), demo_question=m["demo"]["question"], demo_answer=m["demo"]["answer"],
                   demo_gen_image=j(m["demo"]["gen_image"]), demo_gen_instruction=m["demo"]["gen_instruction"])


# ---- reading the wheel files ------------------------------------------------------------------------


def _dicom(name: str) -> DicomImage:
    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(f"pydicom test file {name} is not installed")
    return read_dicom(path)


def _nibabel_file(name: str) -> str:
    return os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", name)


def _skimage():
    try:  # optional: the set is built without scikit-image's images when it is missing
        import skimage.data as data
    except ImportError:
        return None
    return data


def _grey(unit: np.ndarray) -> np.ndarray:
    return to_uint8(np.clip(unit, 0.0, 1.0))


def _mri_style(hu: np.ndarray) -> np.ndarray:
    """A T2-looking contrast from CT Hounsfield units (see the module doc: not a real MRI)."""
    soft = np.clip((hu + 100.0) / 200.0, 0.0, 1.0)  # -100..100 HU: fat .. soft tissue
    out = 0.25 + 0.45 * (1.0 - soft)  # water/fluid (~0-20 HU) brighter than dense soft tissue
    out = np.where(hu < -300, 0.0, out)  # air: no signal
    out = np.where(hu > 250, 0.05, out)  # cortical bone: no signal
    out = np.where((hu >= -300) & (hu < -40), 0.85, out)  # fat: bright
    return out.astype(np.float32)


# ---- the set ----------------------------------------------------------------------------------------


def _images(img_dir: str) -> dict:
    """Write every image; -> name -> dict(path, facts...)."""
    out = {}

    def put(name, arr, **facts):
        out[name] = dict(path=imaging.save_png(arr, os.path.join(img_dir, name + ".png")), **facts)

    ct_head = _dicom("J2K_pixelrep_mismatch.dcm").values  # Hounsfield units
    ct_spine = _dicom("CT_small.dcm").values
    mr_abd = _dicom("examples_overlay.dcm").values
    mr_small = _dicom("MR_small.dcm").values
    us = _dicom("examples_rgb_color.dcm").values  # RGB uint8
    anat = read_volume(_nibabel_file("anatomical.nii"))
    epi = read_volume(_nibabel_file("example4d.nii.gz"))

    put("ct_head", _grey(intensity_unit(ct_head, CT_HEAD_WINDOW)), modality="CT", region="head", organ="brain",
        caption="An axial CT slice of the head showing the brain inside the skull.")
    put("ct_spine", _grey(intensity_unit(ct_spine, CT_SPINE_WINDOW)), modality="CT", region="spine", organ="vertebra",
        caption="An axial CT slice through a vertebra with the surrounding back muscles.")
    put("mr_abdomen", _grey(imaging.percentile_normalise(mr_abd)), modality="MRI", region="abdomen", organ="liver",
        caption="An axial MRI slice of the upper abdomen with a marked lesion in the liver.")
    put("mr_small", _grey(imaging.percentile_normalise(mr_small)), modality="MRI", region=None, organ=None,
        caption="A small, low-resolution MRI slice.")
    put("us_lymph_node", us, modality="ultrasound", region="neck", organ="lymph node",
        caption="An ultrasound image of a lymph node.")
    for z in (9, 13, 17):
        put(f"mr_brain_{z}", _grey(imaging.percentile_normalise(imaging.pad_to_square(take_slice(anat, z)))),
            modality="MRI", region="head", organ="brain", caption="A low-resolution MRI slice of the brain.")
    put("epi_brain", _grey(imaging.percentile_normalise(imaging.pad_to_square(take_slice(epi, 12)))),
        modality="MRI", region="head", organ="brain", caption="An echo-planar (functional) MRI slice of the brain.")
    sk = _skimage()
    if sk is not None:
        retina = np.asarray(sk.retina())
        put("fundus", imaging.resize(retina, 512, "area"), modality="fundus photography", region="eye", organ="retina",
            caption="A colour fundus photograph of the retina with the optic disc and blood vessels.")
        put("pathology_ihc", np.asarray(sk.immunohistochemistry()), modality="microscopy", region=None, organ=None,
            stain="immunohistochemistry", caption="A microscopy image of tissue stained by immunohistochemistry.")
        put("microaneurysms", np.asarray(sk.microaneurysms()), modality="fundus photography", region="eye", organ="retina",
            caption="A close-up greyscale fundus image of retinal vessels with microaneurysms.")
    # generation material: 256 x 256 squares (unit floats kept for the pairs)
    gen = {
        "ct_head": intensity_unit(ct_head, CT_HEAD_WINDOW),
        "mr_abdomen": imaging.percentile_normalise(mr_abd),
        "mr_brain_13": imaging.percentile_normalise(take_slice(anat, 13)),
        "epi_brain": imaging.percentile_normalise(take_slice(epi, 12)),
        "ct_spine": intensity_unit(ct_spine, CT_SPINE_WINDOW),
    }
    out["_gen"] = {k: imaging.square_unit(v, GEN_SIZE) for k, v in gen.items()}
    out["_hu"] = {"ct_head": ct_head, "ct_spine": ct_spine}
    return out


def _comp(rid, image, question, answer) -> dict:
    return {"id": rid, "task": "comp", "image": image,
            "conversations": [{"from": "human", "value": IMAGE_PLACEHOLDER + "\n" + question}, {"from": "gpt", "value": answer}]}


def _gen(rid, image, target, instruction) -> dict:
    return {"id": rid, "task": "gen", "image": image, "target_image": target,
            "conversations": [{"from": "human", "value": IMAGE_PLACEHOLDER + "\n" + instruction}]}


MODALITY_Q = "What imaging modality was used to acquire this image?"
REGION_Q = "Which part of the body is shown in this image?"
ORGAN_Q = "Which organ is the focus of this image?"
CAPTION_Q = "Describe the image briefly."
RECON_Q = "Reconstruct this image."
CT2MR_Q = "Convert this CT slice into the corresponding MRI slice."
MR2CT_Q = "Convert this MRI slice into the corresponding CT slice."
SR_Q = "Reconstruct this low-resolution {m} image at high resolution."


def _rows(images: dict, root: str) -> tuple:
    rel = lambda p: os.path.relpath(p, root)  # noqa: E731
    align, instruct = [], []
    named = {k: v for k, v in images.items() if not k.startswith("_")}
    for name, f in named.items():
        img = rel(f["path"])
        align.append(_comp(f"align-caption-{name}", img, CAPTION_Q, f["caption"]))
        m = f["modality"]
        instruct.append(_comp(f"vqa-{name}-modality", img, MODALITY_Q, m))
        for other, article in (("CT", "a"), ("MRI", "an")):
            instruct.append(_comp(f"vqa-{name}-is-{other.lower()}", img, f"Is this {article} {other} image?",
                                  "yes" if other == m else "no"))
        if f.get("region"):
            instruct.append(_comp(f"vqa-{name}-region", img, REGION_Q, f["region"]))
        if f.get("organ"):
            instruct.append(_comp(f"vqa-{name}-organ", img, ORGAN_Q, f["organ"]))
        if f.get("stain"):
            instruct.append(_comp(f"vqa-{name}-stain", img, "What kind of staining was used on this tissue?", f["stain"]))
    if "mr_abdomen" in named:
        instruct.append(_comp("vqa-mr_abdomen-lesion", rel(named["mr_abdomen"]["path"]),
                              "Which organ contains the marked lesion?", "liver"))
    # generation: reconstruction (stage 1), super-resolution and CT <-> MRI-style (stage 3)
    gdir = os.path.join(root, "images", "gen")
    for name, unit in images["_gen"].items():
        hr = imaging.save_png(to_uint8(unit), os.path.join(gdir, f"{name}_256.png"))
        align.append(_gen(f"align-recon-{name}", rel(hr), rel(hr), RECON_Q))
        lr = imaging.save_png(to_uint8(imaging.degrade(unit, 4).clip(0, 1)), os.path.join(gdir, f"{name}_lr4x.png"))
        modality = "CT" if name.startswith("ct") else "MRI"
        instruct.append(_gen(f"sr4x-{name}", rel(lr), rel(hr), SR_Q.format(m=modality)))
    for name, hu in images["_hu"].items():
        views = {"full": hu, "zoom": _centre_crop(hu, 0.75), "flip": hu[:, ::-1]}
        window = CT_HEAD_WINDOW if name == "ct_head" else CT_SPINE_WINDOW
        for view, v in views.items():
            ct = imaging.save_png(to_uint8(imaging.square_unit(intensity_unit(v, window), GEN_SIZE)), os.path.join(gdir, f"{name}_{view}_ct.png"))
            mr = imaging.save_png(to_uint8(imaging.square_unit(_mri_style(v), GEN_SIZE)), os.path.join(gdir, f"{name}_{view}_mristyle.png"))
            instruct.append(_gen(f"ct2mr-{name}-{view}", rel(ct), rel(mr), CT2MR_Q))
            if view == "full":
                instruct.append(_gen(f"mr2ct-{name}-{view}", rel(mr), rel(ct), MR2CT_Q))
    return align, instruct


def _centre_crop(a: np.ndarray, frac: float) -> np.ndarray:
    h, w = a.shape[:2]
    ch, cw = int(round(h * frac)), int(round(w * frac))
    top, left = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(a[top : top + ch, left : left + cw])


def _source_key() -> str:
    """Versions of the packages the set is read from (a new version may change the bytes)."""
    parts = [f"v{SAMPLESET_VERSION}", f"pydicom={pydicom.__version__}", f"nibabel={nibabel.__version__}", f"pillow={PIL.__version__}"]
    sk = _skimage()
    if sk is not None:
        import skimage  # optional, as in _skimage

        parts.append(f"skimage={skimage.__version__}")
    return hashlib.sha256(";".join(parts).encode()).hexdigest()[:12]


def build_sample_set(cache_dir: str | None = None, force: bool = False) -> SampleSet:
    """Build (once) and return the bundled sample set (module docstring); safe to call concurrently."""
    base = os.path.join(cache_dir or default_cache_dir(), "samples")
    root = os.path.join(base, f"v{SAMPLESET_VERSION}-{_source_key()}")
    if os.path.isfile(os.path.join(root, "manifest.json")) and not force:
        return SampleSet.at(root)
    os.makedirs(base, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=base, prefix=".build-")
    try:
        images = _images(os.path.join(tmp, "images"))
        align, instruct = _rows(images, tmp)
        write_rows(align, os.path.join(tmp, "align.json"))
        write_rows(instruct, os.path.join(tmp, "instruct.json"))
        write_rows(align + instruct, os.path.join(tmp, "mixed.json"))
        demo = {
            "image": os.path.relpath(images["ct_head"]["path"], tmp),
            "question": ORGAN_Q,
            "answer": images["ct_head"]["organ"],
            "gen_image": os.path.join("images", "gen", "ct_head_full_ct.png"),
            "gen_instruction": CT2MR_Q,
        }
        counts = {"align": len(align), "instruct": len(instruct)}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump({"version": SAMPLESET_VERSION, "key": _source_key(), "demo": demo, "rows": counts,
                       "skimage": _skimage() is not None}, f, indent=1)
        if force and os.path.isdir(root):
            shutil.rmtree(root)
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SampleSet.at(root)
