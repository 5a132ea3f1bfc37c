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

SAMPLESET_VERSION = 4  # 4: more CT training views; 3: a held-out split and more training views; 2: CT windows are DICOM's VOI window
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
    heldout_vqa: str  # held-out questions (healthgpt.evaluation.data's vqa format): no training row shows their images
    heldout_gen: str  # held-out image pairs (its image format)
    split: str  # how the held-out split was made

    @classmethod
    def at(cls, root: str) -> "SampleSet":
        with open(os.path.join(root, "manifest.json")) as f:
            m = json.load(f)
        j = lambda p: os.path.join(root, p)  # noqa: E731
        return cls(root=root, align=j("align.json"), mixed=j("mixed.json"), instruct=j("instruct.json"),
                   demo_image=j(m["demo"]["image"]), demo_question=m["demo"]["question"], demo_answer=m["demo"]["answer"],
                   demo_gen_image=j(m["demo"]["gen_image"]), demo_gen_instruction=m["demo"]["gen_instruction"],
                   heldout_vqa=j("heldout_vqa.json"), heldout_gen=j("heldout_gen.json"), split=m["split"])


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

# The held-out split (``heldout_vqa.json``, ``heldout_gen.json``): images no training row shows.
# Volumes: other slices (training and held-out slice indices are disjoint); CT slices: other crops
# (off-centre, 70-75 % of the side) in other display windows than any training view; fundus and
# pathology: the other half of the picture (training sees only the left / top half).
TRAIN_SLICES = {"anatomical": (7, 9, 13, 17, 19), "epi": (4, 12, 20)}
HELDOUT_SLICES = {"anatomical": (11, 15, 21), "epi": (8, 16)}
CT_SOURCES = {  # name -> (pydicom file, training window (centre, width) in HU, region, organ)
    "ct_head": ("J2K_pixelrep_mismatch.dcm", CT_HEAD_WINDOW, "head", "brain"),
    "ct_head2": ("693_J2KI.dcm", CT_HEAD_WINDOW, "head", "brain"),
    "ct_spine": ("CT_small.dcm", CT_SPINE_WINDOW, "spine", "vertebra"),
}
CT_TRAIN_ZOOM_WINDOW = {"ct_head": (40, 400), "ct_head2": (40, 400), "ct_spine": (40, 800)}  # bone-ish
CT_TRAIN_VIEWS = [((0.8, 0.5, 0.0), (40, 160)), ((0.8, 0.5, 1.0), (40, 300))]  # more CT looks: left/right crops
CT_HELDOUT_VIEWS = {  # name -> [(crop (side fraction, top, left) with top/left as fractions of the slack, window)]
    "ct_head": [((0.7, 0.1, 0.0), (40, 90)), ((0.7, 0.9, 1.0), (45, 200))],
    "ct_head2": [((0.7, 0.0, 1.0), (40, 90)), ((0.7, 1.0, 0.0), (45, 200))],
    "ct_spine": [((0.75, 0.0, 0.0), (50, 300)), ((0.75, 1.0, 1.0), (30, 550))],
}
SPLIT_NOTE = ("held-out split: brain MR volume slices z=11,15,21 and EPI slices z=8,16 (training: z=7,9,13,17,19 "
              "and z=4,12,20); off-centre crops of the three CT slices in display windows no training view uses "
              "(training: full slice in the brain/soft-tissue window, centre crop in a bone window, left/right 80 % crops in "
              "(40, 160) and (40, 300) HU windows); the right half "
              "of the fundus photograph and the bottom half of the pathology slide (training: the left / top half); "
              "a crop of the abdominal MR")


def _brain_slice(volume: np.ndarray, z: int) -> np.ndarray:
    return imaging.percentile_normalise(imaging.pad_to_square(take_slice(volume, z)))


def _images(img_dir: str) -> dict:
    """Write every training image; -> name -> dict(path, facts...) plus ``_gen`` / ``_hu`` material."""
    out = {}

    def put(name, arr, **facts):
        out[name] = dict(path=imaging.save_png(arr, os.path.join(img_dir, name + ".png")), **facts)

    hu = {name: _dicom(file).values for name, (file, *_rest) in CT_SOURCES.items()}  # Hounsfield units
    mr_abd = _dicom("examples_overlay.dcm").values
    mr_small = _dicom("MR_small.dcm").values
    us = _dicom("examples_rgb_color.dcm").values  # RGB uint8
    anat = read_volume(_nibabel_file("anatomical.nii"))
    epi = read_volume(_nibabel_file("example4d.nii.gz"))

    put("ct_head", _grey(intensity_unit(hu["ct_head"], CT_HEAD_WINDOW)), modality="CT", region="head", organ="brain",
        caption="An axial CT slice of the head showing the brain inside the skull.")
    put("ct_spine", _grey(intensity_unit(hu["ct_spine"], CT_SPINE_WINDOW)), modality="CT", region="spine", organ="vertebra",
        caption="An axial CT slice through a vertebra with the surrounding back muscles.")
    put("ct_head2", _grey(intensity_unit(hu["ct_head2"], CT_HEAD_WINDOW)), modality="CT", region="head", organ="brain",
        caption="An axial CT slice of the head showing the brain inside the skull.")
    for name, (_file, _w, region, organ) in CT_SOURCES.items():
        zoom = intensity_unit(_centre_crop(hu[name], 0.75), CT_TRAIN_ZOOM_WINDOW[name])
        put(f"{name}_zoom_bone", _grey(zoom), modality="CT", region=region, organ=organ,
            caption=f"A close-up axial CT slice of the {region} in a bone window.")
        for i, (crop, window) in enumerate(CT_TRAIN_VIEWS):
            put(f"{name}_view{i}", _grey(intensity_unit(_crop(hu[name], *crop), window)), modality="CT", region=region,
                organ=organ, caption=f"A cropped axial CT slice of the {region}.")
    put("mr_abdomen", _grey(imaging.percentile_normalise(mr_abd)), modality="MRI", region="abdomen", organ="liver",
        caption="An axial MRI slice of the upper abdomen with a marked lesion in the liver.")
    put("mr_small", _grey(imaging.percentile_normalise(mr_small)), modality="MRI", region=None, organ=None,
        caption="A small, low-resolution MRI slice.")
    put("us_lymph_node", us, modality="ultrasound", region="neck", organ="lymph node",
        caption="An ultrasound image of a lymph node.")
    for z in TRAIN_SLICES["anatomical"]:
        put(f"mr_brain_{z}", _grey(_brain_slice(anat, z)),
            modality="MRI", region="head", organ="brain", caption="A low-resolution MRI slice of the brain.")
    for z in TRAIN_SLICES["epi"]:
        put("epi_brain" if z == 12 else f"epi_brain_{z}", _grey(_brain_slice(epi, z)),
            modality="MRI", region="head", organ="brain", caption="An echo-planar (functional) MRI slice of the brain.")
    sk = _skimage()
    if sk is not None:
        retina = np.asarray(sk.retina())
        put("fundus", imaging.resize(_half(retina, "left"), (512, 256), "area"), modality="fundus photography",
            region="eye", organ="retina", caption="The left half of a colour fundus photograph of the retina with blood vessels.")
        put("pathology_ihc", _half(np.asarray(sk.immunohistochemistry()), "top"), modality="microscopy", region=None,
            organ=None, stain="immunohistochemistry", caption="A microscopy image of tissue stained by immunohistochemistry.")
        put("microaneurysms", np.asarray(sk.microaneurysms()), modality="fundus photography", region="eye", organ="retina",
            caption="A close-up greyscale fundus image of retinal vessels with microaneurysms.")
    # generation material: 256 x 256 squares (unit floats kept for the pairs)
    gen = {
        "ct_head": intensity_unit(hu["ct_head"], CT_HEAD_WINDOW),
        "ct_head2": intensity_unit(hu["ct_head2"], CT_HEAD_WINDOW),
        "mr_abdomen": imaging.percentile_normalise(mr_abd),
        "epi_brain": imaging.percentile_normalise(take_slice(epi, 12)),
        "ct_spine": intensity_unit(hu["ct_spine"], CT_SPINE_WINDOW),
    }
    for z in TRAIN_SLICES["anatomical"][1:4]:
        gen[f"mr_brain_{z}"] = imaging.percentile_normalise(take_slice(anat, z))
    out["_gen"] = {k: imaging.square_unit(v, GEN_SIZE) for k, v in gen.items()}
    out["_hu"] = hu
    out["_volumes"] = {"anatomical": anat, "epi": epi}
    out["_other"] = {"mr_abdomen": mr_abd}
    return out


def _half(img: np.ndarray, side: str) -> np.ndarray:
    """The ``left``/``right``/``top``/``bottom`` half of an image (training and held-out halves)."""
    h, w = img.shape[:2]
    parts = {"left": img[:, : w // 2], "right": img[:, w // 2 :], "top": img[: h // 2], "bottom": img[h // 2 :]}
    return np.ascontiguousarray(parts[side])


def _crop(a: np.ndarray, frac: float, top: float, left: float) -> np.ndarray:
    """A ``frac`` x ``frac`` crop placed at ``top``/``left`` fractions of the remaining slack."""
    h, w = a.shape[:2]
    ch, cw = int(round(h * frac)), int(round(w * frac))
    y, x = int(round((h - ch) * top)), int(round((w - cw) * left))
    return np.ascontiguousarray(a[y : y + ch, x : x + cw])


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
        window = CT_SOURCES[name][1]
        for view, v in views.items():
            ct = imaging.save_png(to_uint8(imaging.square_unit(intensity_unit(v, window), GEN_SIZE)), os.path.join(gdir, f"{name}_{view}_ct.png"))
            mr = imaging.save_png(to_uint8(imaging.square_unit(_mri_style(v), GEN_SIZE)), os.path.join(gdir, f"{name}_{view}_mristyle.png"))
            instruct.append(_gen(f"ct2mr-{name}-{view}", rel(ct), rel(mr), CT2MR_Q))
            if view == "full":
                instruct.append(_gen(f"mr2ct-{name}-{view}", rel(mr), rel(ct), MR2CT_Q))
    return align, instruct


def _heldout(images: dict, root: str) -> tuple:
    """The held-out split (``SPLIT_NOTE``) in the evaluation suite's formats (``healthgpt.evaluation.data``):
    -> (VQA rows: modality / region / organ open questions and "Is this a CT/MRI image?" closed ones,
    image rows: reconstruction, 4x super-resolution, CT -> MRI-style and MRI-style -> CT pairs)."""
    hdir = os.path.join(root, "heldout")
    rel = lambda p: os.path.relpath(p, root)  # noqa: E731
    views = {}  # name -> (unit image or RGB uint8, facts)
    hu = images["_hu"]
    for name, crops in CT_HELDOUT_VIEWS.items():
        _file, _w, region, organ = CT_SOURCES[name]
        for i, (crop, window) in enumerate(crops):
            values = _crop(hu[name], *crop)
            views[f"{name}_crop{i}"] = (intensity_unit(values, window), dict(modality="CT", region=region, organ=organ, hu=values))
    for vol, slices in HELDOUT_SLICES.items():
        for z in slices:
            views[f"{'mr_brain' if vol == 'anatomical' else 'epi_brain'}_{z}"] = (
                _brain_slice(images["_volumes"][vol], z), dict(modality="MRI", region="head", organ="brain"))
    views["mr_abdomen_crop"] = (imaging.percentile_normalise(_crop(images["_other"]["mr_abdomen"], 0.7, 0.5, 0.0)),
                                dict(modality="MRI", region="abdomen", organ="liver"))
    sk = _skimage()
    if sk is not None:
        views["fundus_right"] = (imaging.resize(_half(np.asarray(sk.retina()), "right"), (512, 256), "area"),
                                 dict(modality="fundus photography", region="eye", organ="retina"))
        views["pathology_bottom"] = (_half(np.asarray(sk.immunohistochemistry()), "bottom"), dict(modality="microscopy"))
    vqa, gen = [], []
    for name, (img, facts) in views.items():
        path = rel(imaging.save_png(img if img.dtype == np.uint8 else _grey(img), os.path.join(hdir, name + ".png")))
        m = facts["modality"]
        vqa.append({"id": f"ho-{name}-modality", "image": path, "question": MODALITY_Q, "answer": m, "answer_type": "open"})
        for key, question in (("region", REGION_Q), ("organ", ORGAN_Q)):
            if facts.get(key):
                vqa.append({"id": f"ho-{name}-{key}", "image": path, "question": question, "answer": facts[key],
                            "answer_type": "open"})
        for other, article in (("CT", "a"), ("MRI", "an")):
            vqa.append({"id": f"ho-{name}-is-{other.lower()}", "image": path, "question": f"Is this {article} {other} image?",
                        "answer": "yes" if other == m else "no", "answer_type": "closed"})
    gdir = os.path.join(hdir, "gen")

    def square(name, unit, suffix=""):
        return rel(imaging.save_png(to_uint8(imaging.square_unit(unit, GEN_SIZE)), os.path.join(gdir, f"{name}{suffix}.png")))

    def pair(kind, name, image, target, instruction, task):
        gen.append({"id": f"ho-{kind}-{name}", "image": image, "target": target, "instruction": instruction, "task": task})

    for name in ("mr_brain_15", "epi_brain_8", "ct_head_crop0"):
        hr = square(name, views[name][0])
        pair("recon", name, hr, hr, RECON_Q, "reconstruction")
    for name in ("mr_brain_11", "ct_spine_crop1"):
        unit = imaging.square_unit(views[name][0], GEN_SIZE)
        hr = square(name, unit)
        lr = rel(imaging.save_png(to_uint8(imaging.degrade(unit, 4).clip(0, 1)), os.path.join(gdir, f"{name}_lr4x.png")))
        pair("sr4x", name, lr, hr, SR_Q.format(m=views[name][1]["modality"]), "super-resolution")
    for name, direction in (("ct_head_crop1", "ct2mr"), ("ct_head2_crop0", "ct2mr"), ("ct_head2_crop1", "mr2ct")):
        ct, mr = square(name, views[name][0], "_ct"), square(name, _mri_style(views[name][1]["hu"]), "_mristyle")
        if direction == "ct2mr":
            pair(direction, name, ct, mr, CT2MR_Q, "CT to MRI-style")
        else:
            pair(direction, name, mr, ct, MR2CT_Q, "MRI-style to CT")
    return vqa, gen


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
        heldout_vqa, heldout_gen = _heldout(images, tmp)
        write_rows(align, os.path.join(tmp, "align.json"))
        write_rows(instruct, os.path.join(tmp, "instruct.json"))
        write_rows(align + instruct, os.path.join(tmp, "mixed.json"))
        write_rows(heldout_vqa, os.path.join(tmp, "heldout_vqa.json"))
        write_rows(heldout_gen, os.path.join(tmp, "heldout_gen.json"))
        demo = {
            "image": os.path.relpath(images["ct_head"]["path"], tmp),
            "question": ORGAN_Q,
            "answer": images["ct_head"]["organ"],
            "gen_image": os.path.join("images", "gen", "ct_head_full_ct.png"),
            "gen_instruction": CT2MR_Q,
        }
        counts = {"align": len(align), "instruct": len(instruct), "heldout_vqa": len(heldout_vqa), "heldout_gen": len(heldout_gen)}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump({"version": SAMPLESET_VERSION, "key": _source_key(), "demo": demo, "rows": counts, "split": SPLIT_NOTE,
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
