"""Converters from the public datasets' layouts to the training format, on tiny files made here."""

import json
import os
import pickle
import shutil

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from healthgpt.data import DataError, load_samples
from healthgpt.data import imaging
from healthgpt.data.images import load_image
from healthgpt.data.converters import (
    convert_ixi,
    convert_pathvqa,
    convert_slake,
    convert_synthrad,
    convert_vqa_rad,
    merge_files,
)


NIB_DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")


def _jpg(path, seed=0, size=(20, 16)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return path


def _nifti(path, data, zooms=(1.0, 1.0, 2.0)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = nib.Nifti1Image(data.astype(np.float32), np.diag([*zooms, 1.0]))
    nib.save(img, path)
    return path


# ---- comprehension ------------------------------------------------------------------------------------


def _vqa_rad(root, missing=False):
    folder = root / "VQA_RAD Image Folder"
    _jpg(str(folder / "synpic100.jpg"))
    _jpg(str(folder / "synpic200.jpg"), seed=1)
    rows = [
        {"qid": 1, "image_name": "synpic100.jpg", "image_organ": "HEAD", "answer": "Yes", "answer_type": "CLOSED",
         "question_type": "PRES", "question": "Is there a fracture?", "phrase_type": "freeform"},
        {"qid": 2, "image_name": "synpic200.jpg", "image_organ": "CHEST", "answer": "left lung", "answer_type": "OPEN",
         "question_type": "POS", "question": "Where is the mass?", "phrase_type": "para"},
        {"qid": 3, "image_name": "synpic100.jpg", "image_organ": "HEAD", "answer": "no", "answer_type": "CLOSED",
         "question_type": "PRES", "question": "Is there a bleed?", "phrase_type": "test_freeform"},
    ]
    if missing:
        rows.append({"qid": 4, "image_name": "synpic999.jpg", "answer": "no", "answer_type": "CLOSED",
                     "question": "Is it normal?", "phrase_type": "freeform"})
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    return root


def test_vqa_rad_layout_and_split(tmp_path):
    root = _vqa_rad(tmp_path / "vqarad")
    out = tmp_path / "train" / "vqarad.json"
    rep = convert_vqa_rad(str(root), str(out))
    assert rep.written == 2 and rep.by_task["comp"] == 2
    rows = json.loads(out.read_text())
    assert rows[0]["id"] == "vqarad-1" and rows[0]["answer_type"] == "closed" and rows[1]["answer_type"] == "open"
    assert rows[0]["conversations"] == [{"from": "human", "value": "<image>\nIs there a fracture?"},
                                        {"from": "gpt", "value": "Yes"}]
    assert not os.path.isabs(rows[0]["image"])  # relative to the output file
    samples, _ = load_samples(str(out))
    assert samples[0].image == str(root / "VQA_RAD Image Folder" / "synpic100.jpg")
    assert convert_vqa_rad(str(root), str(tmp_path / "test.json"), split="test").written == 1


def test_vqa_rad_missing_image_names_the_row_or_is_counted(tmp_path):
    root = _vqa_rad(tmp_path / "vqarad", missing=True)
    with pytest.raises(DataError, match=r"row 3 \(qid 4\).*synpic999\.jpg"):
        convert_vqa_rad(str(root), str(tmp_path / "a.json"))
    rep = convert_vqa_rad(str(root), str(tmp_path / "a.json"), skip_bad=True)
    assert rep.written == 2 and rep.skipped == {"missing image": 1}
    assert "skipped 1" in rep.summary()


def test_slake_layout_language_filter_and_missing_image(tmp_path):
    root = tmp_path / "Slake1.0"
    _jpg(str(root / "imgs" / "xmlab102" / "source.jpg"))
    rows = [
        {"img_id": 102, "img_name": "xmlab102/source.jpg", "question": "Which organ is abnormal?", "answer": "Liver",
         "q_lang": "en", "location": "Abdomen", "modality": "CT", "answer_type": "OPEN", "qid": 11},
        {"img_id": 102, "img_name": "xmlab102/source.jpg", "question": "哪个器官异常？", "answer": "肝脏",
         "q_lang": "zh", "modality": "CT", "answer_type": "OPEN", "qid": 12},
        {"img_id": 103, "img_name": "xmlab103/source.jpg", "question": "Is this a CT?", "answer": "Yes",
         "q_lang": "en", "modality": "CT", "answer_type": "CLOSED", "qid": 13},
    ]
    (root / "train.json").write_text(json.dumps(rows, ensure_ascii=False))
    with pytest.raises(DataError, match=r"row 2 \(qid 13\).*xmlab103/source\.jpg"):
        convert_slake(str(root), str(tmp_path / "s.json"))
    rep = convert_slake(str(root), str(tmp_path / "s.json"), skip_bad=True)
    out = json.loads((tmp_path / "s.json").read_text())
    assert rep.written == 1 and out[0]["id"] == "slake-11" and out[0]["modality"] == "CT" and out[0]["lang"] == "en"
    assert convert_slake(str(root), str(tmp_path / "all.json"), lang=None, skip_bad=True).written == 2


def test_pathvqa_pickle_layout(tmp_path):
    root = tmp_path / "pvqa"
    _jpg(str(root / "images" / "train" / "train_0000.jpg"))
    _jpg(str(root / "images" / "train" / "train_0001.jpg"), seed=3)
    rows = [{"image": "train_0000", "question": "What is present?", "answer": "necrosis"},
            {"image": "train_0001", "question": "Is inflammation present?", "answer": "yes"},
            {"image": "train_0002", "question": "Where is this?", "answer": "liver"}]
    (root / "qas" / "train").mkdir(parents=True)
    with open(root / "qas" / "train" / "train_qa.pkl", "wb") as f:
        pickle.dump(rows, f)
    rep = convert_pathvqa(str(tmp_path), str(tmp_path / "p.json"), skip_bad=True)  # the folder above pvqa/ works too
    out = json.loads((tmp_path / "p.json").read_text())
    assert rep.written == 2 and rep.skipped == {"missing image": 1}
    assert [r["answer_type"] for r in out] == ["open", "closed"]
    with pytest.raises(DataError, match="row 2.*train_0002"):
        convert_pathvqa(str(root), str(tmp_path / "p.json"))


def test_pathvqa_pickle_cannot_run_code(tmp_path):
    root = tmp_path / "pvqa"
    (root / "qas" / "train").mkdir(parents=True)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with open(root / "qas" / "train" / "train_qa.pkl", "wb") as f:
        pickle.dump([Evil()], f)
    with pytest.raises(DataError, match="refusing to unpickle"):
        convert_pathvqa(str(root), str(tmp_path / "p.json"))
    assert not (tmp_path / "pwned").exists()


# ---- generation ----------------------------------------------------------------------------------------


def _synthrad(root, patient="1BA001", missing_mr=False):
    shape = (24, 20, 10)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = (x**2 + y**2) < 0.6
    ct = np.where(body, 40.0, -1000.0)  # soft tissue at the window level inside, air outside
    ct[(x**2 + y**2 > 0.45) & body] = 1000.0  # a bone ring
    mr = np.where(body, 300.0 + 100 * z, 0.0)
    mask = body.astype(np.float32)
    mask[..., :2] = 0  # the first slices hold no body: skipped
    d = root / "Task1" / "brain" / patient
    _nifti(str(d / "ct.nii.gz"), ct)
    if not missing_mr:
        _nifti(str(d / "mr.nii.gz"), mr)
    _nifti(str(d / "mask.nii.gz"), mask)
    return shape


def test_synthrad_pairs_windowing_and_mask(tmp_path):
    _synthrad(tmp_path / "synthrad")
    out = tmp_path / "train" / "synthrad.json"
    rep = convert_synthrad(str(tmp_path / "synthrad"), str(out), stride=3)
    rows = json.loads(out.read_text())
    assert rep.written == len(rows) == 2 * 3  # slices 2, 5, 8 (mask-free 0, 1 skipped), both directions
    ct2mr = [r for r in rows if r["id"].endswith("ct2mr")]
    assert [r["id"] for r in ct2mr] == [f"synthrad-brain-1BA001-z{z:03d}-ct2mr" for z in (2, 5, 8)]
    r = ct2mr[0]
    assert r["task"] == "gen" and r["subtask"] == "CT to MRI (brain)"
    assert "Convert this CT" in r["conversations"][0]["value"]
    samples, _ = load_samples(str(out))
    ct = np.asarray(Image.open(samples[0].image))
    mr = np.asarray(Image.open(samples[0].target_image))
    assert ct.shape == mr.shape == (256, 256)
    # window (40, 400): 40 HU -> 0.5 -> 128; bone (1000 HU) saturates at 255; outside the mask 0
    assert abs(int(ct[128, 128]) - 128) <= 2 and ct.max() == 255 and ct[0, 0] == 0
    mirrored = [r for r in rows if r["id"].endswith("mr2ct")][0]
    assert mirrored["image"] == r["target_image"] and mirrored["target_image"] == r["image"]


def test_synthrad_missing_volume(tmp_path):
    _synthrad(tmp_path / "s")
    _synthrad(tmp_path / "s", patient="1BA002", missing_mr=True)
    with pytest.raises(DataError, match="1BA002.*mr.nii.gz"):
        convert_synthrad(str(tmp_path / "s"), str(tmp_path / "o.json"))
    rep = convert_synthrad(str(tmp_path / "s"), str(tmp_path / "o.json"), skip_bad=True, direction="ct2mr")
    assert rep.skipped == {"missing volume": 1} and rep.written > 0


def test_ixi_super_resolution_pairs(tmp_path):
    rng = np.random.default_rng(0)
    vol = np.zeros((32, 32, 12), np.float32)
    vol[4:28, 4:28, 2:10] = rng.uniform(100, 800, (24, 24, 8))
    _nifti(str(tmp_path / "IXI-T1" / "IXI002-Guys-0828-T1.nii.gz"), vol)
    _nifti(str(tmp_path / "IXI-T2" / "IXI002-Guys-0828-T2.nii.gz"), vol * 0.5)
    _nifti(str(tmp_path / "IXI-T1" / "notes.nii.gz"), vol)  # not an IXI name
    with pytest.raises(DataError, match="notes.nii.gz"):
        convert_ixi(str(tmp_path), str(tmp_path / "ixi.json"))
    rep = convert_ixi(str(tmp_path), str(tmp_path / "ixi.json"), stride=4, factor=4, skip_bad=True)
    rows = json.loads((tmp_path / "ixi.json").read_text())
    assert rep.skipped == {"unrecognised name": 1}
    assert {r["subtask"] for r in rows} == {"super-resolution x4 (T1)", "super-resolution x4 (T2)"}
    assert rows[0]["id"].startswith("ixi-IXI002-T1-z") and "low-resolution T1 MRI" in rows[0]["conversations"][0]["value"]
    samples, _ = load_samples(str(tmp_path / "ixi.json"))
    lr = np.asarray(Image.open(samples[0].image)).astype(np.float32) / 255
    hr = np.asarray(Image.open(samples[0].target_image)).astype(np.float32) / 255
    assert lr.shape == hr.shape == (256, 256)
    # the input is the target area-downsampled 4x and upsampled back: smoother, same mean
    expected = imaging.degrade(hr, 4).clip(0, 1)
    assert np.abs(lr - expected).max() <= 2.5 / 255
    assert np.abs(np.diff(lr, axis=1)).mean() < np.abs(np.diff(hr, axis=1)).mean()


def test_synthrad_pixels_are_what_inference_reads(tmp_path):
    """A real NIfTI (nibabel's test brain, 33 x 41 axial slices) as the CT: each converted slice,
    inside its zero padding, equals ``load_image`` of that file, slice and window."""
    src = os.path.join(NIB_DATA, "anatomical.nii")
    d = tmp_path / "s" / "Task1" / "brain" / "1BA001"
    os.makedirs(d)
    for name in ("ct.nii", "mr.nii"):
        shutil.copy(src, d / name)
    window = (9000.0, 6001.0)  # its intensities: 10th .. 90th percentile about 4900 .. 11200
    out = tmp_path / "o.json"
    convert_synthrad(str(tmp_path / "s"), str(out), direction="ct2mr", size=41, stride=7, min_mask=0.0)
    rows = json.loads(out.read_text())
    assert len(rows) == 4  # slices 0, 7, 14, 21 of 25
    convert_synthrad(str(tmp_path / "s"), str(out), direction="ct2mr", size=41, stride=7, min_mask=0.0, ct_window=window)
    for r in json.loads(out.read_text()):
        z = int(r["id"].split("-z")[1][:3])
        png = np.asarray(Image.open(out.parent / r["image"]))
        assert png.shape == (41, 41) and (png[:, :4] == 0).all()  # 33 columns centred on 41
        seen = np.asarray(load_image(src, window=window, slice_index=z))[..., 0]
        assert seen.shape == (41, 33) and 20 < len(np.unique(seen))
        assert np.array_equal(png[:, 4:37], seen)


def test_imaging_helpers():
    sq = imaging.pad_to_square(np.ones((2, 4)))
    assert sq.shape == (4, 4) and sq[0].sum() == 0 and sq[1].sum() == 4
    img = np.arange(64, dtype=np.float32).reshape(8, 8)
    small = imaging.degrade(img, 4, keep_size=False)
    assert small.shape == (2, 2) and np.isclose(small[0, 0], img[:4, :4].mean(), atol=1e-4)
    with pytest.raises(ValueError):
        imaging.degrade(img, 0)


def test_merge_files_rewrites_relative_paths(tmp_path):
    _vqa_rad(tmp_path / "vqarad")
    a = tmp_path / "a" / "x.json"
    convert_vqa_rad(str(tmp_path / "vqarad"), str(a))
    merged = merge_files([str(a)], str(tmp_path / "b" / "deeper" / "all.json"))
    samples, _ = load_samples(merged)
    assert len(samples) == 2 and os.path.isfile(samples[0].image)


def test_data_cli(tmp_path, capsys):
    from healthgpt.cli.data import main

    root = _vqa_rad(tmp_path / "vqarad", missing=True)
    out = str(tmp_path / "t.json")
    assert main(["convert", "vqa-rad", str(root), "--out", out]) == 2
    assert "qid 4" in capsys.readouterr().err
    assert main(["convert", "vqa-rad", str(root), "--out", out, "--skip-bad"]) == 0
    assert "wrote 2 rows" in capsys.readouterr().out
    assert main(["check", out]) == 0
    rows = json.loads(open(out).read()) + [{"id": "bad", "image": "nope.png", "conversations": []}]
    open(out, "w").write(json.dumps(rows))
    assert main(["check", out]) == 2 and "row 2 (id 'bad')" in capsys.readouterr().err
    assert main(["check", out, "--skip-bad"]) == 1 and "skipped 1 bad" in capsys.readouterr().out
    assert main(["convert", "synthrad2023", str(root), "--out", out, "--ct-window", "40"]) == 2
    assert "healthgpt: error: --ct-window must be CENTER,WIDTH" in capsys.readouterr().err
