"""Tuning off the hot path: token buckets, the on-disk choice cache, the launcher's tuned run, and
the training collator's padding that keeps token counts in few buckets."""

import json

import pytest
import torch

from healthgpt.data.dataset import Collator
from hlora.kernels import tuning

pytestmark = pytest.mark.triton


@pytest.fixture(autouse=True)
def _cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HLORA_TUNING_CACHE", str(tmp_path / "tuning.json"))
    tuning.clear_memory()
    yield tmp_path / "tuning.json"
    tuning.clear_memory()


def test_token_buckets():
    assert [tuning.token_bucket(n) for n in (0, 1, 64, 65, 130, 8192, 8193)] == [64, 64, 64, 128, 256, 8192, 16384]


def _timer(times, calls):
    def measure(name):
        calls.append(name)
        return times[name]

    return measure


def test_choice_is_measured_once_then_read_from_memory_and_disk(_cache_file):
    dev = torch.device("cpu")
    times, calls = {"a": 3.0, "b": 1.0, "c": 2.0}, []
    assert tuning.choose("y", dev, (8192, 3072), list(times), _timer(times, calls)) == "b"
    assert sorted(calls) == ["a", "b", "c"]
    assert tuning.choose("y", dev, (8192, 3072), list(times), _timer(times, calls)) == "b"
    assert len(calls) == 3  # from memory
    stored = json.loads(_cache_file.read_text())
    assert list(stored.values()) == ["b"] and "y|cpu|8192,3072|torch=" in next(iter(stored))
    tuning.clear_memory()  # a new process: the disk cache answers
    assert tuning.choose("y", dev, (8192, 3072), list(times), _timer(times, calls)) == "b"
    assert len(calls) == 3
    # another bucket is a new choice; a stored name no longer among the candidates is measured again
    assert tuning.choose("y", dev, (16384, 3072), ["a", "c"], _timer(times, calls)) == "c"
    assert tuning.choose("y", dev, (8192, 3072), ["a", "c"], _timer(times, calls)) == "c"
    assert len(calls) == 7


def test_a_corrupt_cache_file_is_ignored_and_replaced(_cache_file):
    _cache_file.write_text('{"y|cpu": [1, 2')
    times, calls = {"a": 1.0, "b": 2.0}, []
    with pytest.warns(UserWarning, match="ignoring the tuning cache"):
        assert tuning.choose("y", torch.device("cpu"), (64,), ["a", "b"], _timer(times, calls)) == "a"
    assert list(json.loads(_cache_file.read_text()).values()) == ["a"]
    _cache_file.write_text(json.dumps({"k": 3}))  # valid JSON of the wrong shape
    tuning.clear_memory()
    with pytest.warns(UserWarning, match="ignoring the tuning cache"):
        tuning.choose("y", torch.device("cpu"), (64,), ["a", "b"], _timer(times, calls))


def test_tuned_launch_runs_the_fastest_tile_and_resets_accumulators(monkeypatch):
    fused_linear = pytest.importorskip("hlora.kernels.fused_linear")
    launched, resets = [], []

    class Kernel:
        def __getitem__(self, grid):
            def call(**kw):
                launched.append((grid, kw["BLOCK_M"], kw["num_warps"]))
            return call

    tiles = [dict(BLOCK_M=m, num_warps=4, num_stages=3) for m in (64, 128, 256)]
    speed = {64: 3.0, 128: 1.0, 256: 2.0}

    def bench(fn):
        fn()
        return speed[launched[-1][1]]

    monkeypatch.setattr(fused_linear, "_bench", bench)
    x = torch.zeros(2)
    launch = fused_linear.Launch("test", Kernel(), lambda meta: (meta["BLOCK_M"],), dict(x_ptr=x), {}, tiles,
                                 (8192, 7), lambda: resets.append(1))
    fused_linear._run(launch)
    assert [m for _, m, _ in launched] == [64, 128, 256, 128] and launched[-1][0] == (128,)
    assert resets == [1]  # the measuring runs added into the accumulators: zeroed before the real run
    launched.clear()
    fused_linear._run(launch)
    assert [m for _, m, _ in launched] == [128] and resets == [1]


def test_collator_pads_to_64_on_cuda_by_default(monkeypatch):
    feats = [{"input_ids": [5] * n, "labels": [1] * n, "task": "comp"} for n in (3, 70)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    batch = Collator(0)(feats)
    assert batch["input_ids"].shape == (2, 128)
    assert batch["attention_mask"].sum(1).tolist() == [3, 70]
    assert Collator(0, pad_to_multiple_of=None)(feats)["input_ids"].shape == (2, 70)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Collator(0)(feats)["input_ids"].shape == (2, 70)
    assert Collator(0, pad_to_multiple_of=8)(feats)["input_ids"].shape == (2, 72)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        Collator(0, pad_to_multiple_of=0)
