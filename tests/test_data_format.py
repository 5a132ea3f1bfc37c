"""The training-file format, the bundled sample set, the VQ-id cache and the collator."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from healthgpt.data import DataError, load_samples
from healthgpt.data.images import load_image
from healthgpt.data.dataset import Collator, build_dataset
from healthgpt.data.samples import CT_HEAD_WINDOW, CT_SPINE_WINDOW, build_sample_set
from healthgpt.data.vq_cache import VQCache

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend on a shared CPU


def _png(path, value=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)
    return path


def _rows(tmp_path):
    _png(str(tmp_path / "img" / "a.png"))
    _png(str(tmp_path / "img" / "b.png"), 200)
    return [
        {"id": "ok-comp", "image": "img/a.png", "task": "comp",
         "conversations": [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "CT"}]},
        {"id": "ok-gen", "image": "img/a.png", "task": "gen", "target_image": "img/b.png",
         "conversations": [{"from": "human", "value": "<image>\nConvert."}]},
    ]


def _write(tmp_path, rows, name="train.json"):
    p = tmp_path / name
    if name.endswith(".jsonl"):
        p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        p.write_text(json.dumps(rows))
    return str(p)


def test_good_rows_are_normalised(tmp_path):
    samples, rep = load_samples(_write(tmp_path, _rows(tmp_path)))
    comp, gen = samples
    assert rep.kept == 2 and comp.task == "comp" and gen.task == "gen"
    assert comp.conversations[0]["value"] == "<image>\nWhat is it?"  # placeholder added
    assert os.path.isabs(comp.image) and gen.target_image.endswith("b.png")
    assert [s.id for s in load_samples(_write(tmp_path, _rows(tmp_path), "t.jsonl"))[0]] == ["ok-comp", "ok-gen"]
    only_gen, rep = load_samples(_write(tmp_path, _rows(tmp_path)), task="gen")
    assert [s.id for s in only_gen] == ["ok-gen"] and rep.filtered == {"comp": 1}


@pytest.mark.parametrize(
    "bad, reason, message",
    [
        ({"id": "x1", "image": "img/missing.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
         "missing image", r"row 2 \(id 'x1'\): image 'img/missing.png' not found"),
        ({"id": "x2", "image": "img/a.png", "conversations": [{"from": "human", "value": "q"}]},
         "no assistant turn", r"row 2 \(id 'x2'\): no assistant \('gpt'\) turn"),
        ({"id": "x3", "image": "img/a.png", "task": "segmentation",
          "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
         "unknown task", r"row 2 \(id 'x3'\): unknown task 'segmentation'"),
        ({"id": "x4", "image": "img/a.png", "task": "gen", "conversations": [{"from": "human", "value": "q"}]},
         "missing target_image", r"row 2 \(id 'x4'\): no 'target_image'"),
        ({"id": "x5", "image": "img/a.png", "conversations": [{"from": "gpt", "value": "a"}]},
         "bad turn", r"row 2 \(id 'x5'\): conversation turn 0 is from gpt"),
    ],
)
def test_bad_rows_error_names_the_row_or_are_counted(tmp_path, bad, reason, message):
    rows = _rows(tmp_path) + [bad]
    path = _write(tmp_path, rows)
    with pytest.raises(DataError, match=message) as err:
        load_samples(path)
    assert path in str(err.value) and "--skip-bad" in str(err.value)
    samples, rep = load_samples(path, skip_bad=True)
    assert len(samples) == 2 and rep.skipped == {reason: 1}
    assert f"skipped 1 bad ({1} {reason})" in rep.summary()


def test_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_samples(str(tmp_path / "nope.json"))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DataError, match="is not JSON"):
        load_samples(str(tmp_path / "broken.json"))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="no usable rows"):
        load_samples(str(tmp_path / "empty.json"))


@pytest.fixture(scope="module")
def sample_set(tmp_path_factory):
    return build_sample_set(str(tmp_path_factory.mktemp("cache")))


def _digest_tree(root):
    h = hashlib.sha256()
    for dirpath, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for f in sorted(files):
            h.update(os.path.relpath(os.path.join(dirpath, f), root).encode())
            h.update(open(os.path.join(dirpath, f), "rb").read())
    return h.hexdigest()


def test_sample_set_is_real_deterministic_and_valid(sample_set, tmp_path):
    again = build_sample_set(str(tmp_path))
    assert os.path.basename(again.root) == os.path.basename(sample_set.root)
    assert _digest_tree(again.root) == _digest_tree(sample_set.root)  # byte-identical rebuild
    for path in (sample_set.align, sample_set.mixed, sample_set.instruct):
        samples, rep = load_samples(path)
        assert rep.kept == rep.total
    instruct, _ = load_samples(sample_set.instruct)
    tasks = [s.task for s in instruct]
    assert tasks.count("comp") >= 20 and tasks.count("gen") >= 8
    ids = {s.id for s in instruct}
    assert {"vqa-ct_head-modality", "sr4x-ct_head", "ct2mr-ct_head-full"} <= ids
    ct = next(s for s in instruct if s.id == "vqa-ct_head-modality")
    assert ct.conversations[1]["value"] == "CT"
    # the CT slice is the real 512 x 512 head CT from pydicom's test files
    assert Image.open(sample_set.demo_image).size == (512, 512)
    assert build_sample_set(str(tmp_path)).root == again.root  # cached: not rebuilt


@pytest.mark.parametrize("name, file, window", [("ct_head", "J2K_pixelrep_mismatch.dcm", CT_HEAD_WINDOW),
                                                ("ct_spine", "CT_small.dcm", CT_SPINE_WINDOW)])
def test_sample_set_ct_pixels_are_what_inference_reads(sample_set, name, file, window):
    """Training PNG == ``load_image`` of the same DICOM file with the same window, pixel for pixel."""
    png = np.asarray(Image.open(os.path.join(sample_set.root, "images", name + ".png")))
    seen = np.asarray(load_image(get_testdata_file(file), window=window))
    assert png.dtype == np.uint8 and png.shape == seen.shape[:2] and 10 < len(np.unique(png))
    assert np.array_equal(png, seen[..., 0])


def test_vq_cache_is_keyed_by_content(tmp_path):
    from healthgpt.model.config import TINY_VQ
    from healthgpt.model.vq import VQTokenizer

    torch.manual_seed(0)
    tok = VQTokenizer(dict(TINY_VQ, resolution=32))
    a = _png(str(tmp_path / "a.png"), 10)
    b = _png(str(tmp_path / "b.png"), 250)
    cache = VQCache(str(tmp_path / "cache"), tok)
    ids = cache.encode_all([a, b, a])
    assert cache.misses == 2 and cache.hits == 0 and ids[a].shape == (16,)
    assert torch.equal(ids[a], tok.encode_images([Image.open(a).convert("RGB")])[0])
    shutil.copy(a, tmp_path / "renamed.png")  # same bytes, other name: a hit
    again = VQCache(str(tmp_path / "cache"), tok)
    out = again.encode_all([str(tmp_path / "renamed.png"), b])
    assert again.hits == 2 and again.misses == 0 and torch.equal(out[str(tmp_path / "renamed.png")], ids[a])
    _png(a, 99)  # edited file: a miss
    assert VQCache(str(tmp_path / "cache"), tok).get(a) is None
    torch.manual_seed(1)
    other = VQTokenizer(dict(TINY_VQ, resolution=32))  # another tokenizer never reads these ids
    assert VQCache(str(tmp_path / "cache"), other).get(b) is None


def test_collator_pads_and_routes_mixed_batches(sample_set):
    from healthgpt.model.config import TINY_VQ, HealthGPTConfig
    from healthgpt.model.healthgpt import HealthGPT

    torch.manual_seed(0)
    model = HealthGPT(HealthGPTConfig.preset("tiny", image_tokenizer_config=dict(TINY_VQ, resolution=32)))
    ds, rep, cache = build_dataset(model, sample_set.mixed, cache_dir=os.path.dirname(os.path.dirname(sample_set.root)), log=None)
    comp = next(i for i, s in enumerate(ds.samples) if s.task == "comp")
    gen = next(i for i, s in enumerate(ds.samples) if s.task == "gen")
    feats = [ds[comp], ds[gen], ds[comp]]
    batch = Collator(model.pad_id)(feats)
    assert batch["tasks"] == ["comp", "gen", "comp"]
    T = max(len(f["input_ids"]) for f in feats)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, T)
    n = len(feats[0]["input_ids"])
    assert (batch["input_ids"][0, n:] == model.pad_id).all() and (batch["labels"][0, n:] == -100).all()
    assert batch["attention_mask"][0].sum() == n and batch["images"].shape[0] == 3
    # the generation answer is the target's cached VQ ids between <start_index> and <end_index>
    g = feats[1]["labels"][feats[1]["labels"] != -100].tolist()
    v = model.gen_vocab
    start = g.index(v.start)
    codes = torch.tensor(g[start + 1 : start + 1 + model.num_image_codes]) - v.code0
    assert torch.equal(codes, cache.get(ds.samples[gen].target_image)) and g[start + 1 + model.num_image_codes] == v.end
    # right padding: each row holds its sample, then pad ids that are masked and unsupervised
    for b, f in enumerate(feats):
        n = len(f["input_ids"])
        assert torch.equal(batch["input_ids"][b, :n], f["input_ids"]) and torch.equal(batch["labels"][b, :n], f["labels"])
        assert (batch["input_ids"][b, n:] == model.pad_id).all() and (batch["labels"][b, n:] == -100).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert batch["images"].shape[0] == sum(f["images"].shape[0] for f in feats if f["images"] is not None)
    assert batch["tasks"] == [f["task"] for f in feats]
    # and the model takes the mixed batch (per-sample routing)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError):
        Collator(model.pad_id)([])
