"""Issue 12, weights and checkpoints: nothing lost, nothing silently wrong, one clear line per bad file.

Each test name says the promise it keeps: a save killed at any point leaves the whole old or the whole
new model; damaged files (empty, truncated, invalid JSON, NaN/Inf, integer tensors, a text file as a
release .bin) are refused naming the file or tensor; plugins never mix with a merged one.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hlora
from hlora import CheckpointError
from healthgpt import HealthGPT
from healthgpt.model import weights
from healthgpt.model.config import CONFIG_NAME

pytestmark = pytest.mark.usefixtures("one_thread")

PLUGINS = {"comp": hlora.PluginConfig(rank=4, num_experts=1, alpha=8), "gen": hlora.PluginConfig(rank=6, num_experts=3, alpha=4)}


def _model(seed):
    torch.manual_seed(seed)
    model = HealthGPT("tiny").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # every saved tensor differs between the two models
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two tiny models that differ in every weight: (dir of the old, dir of the new, the new model);
    the new model is loaded from its own first save, so every save of it writes the same bytes."""
    root = tmp_path_factory.mktemp("models")
    _model(1).save_pretrained(root / "old")
    _model(2).save_pretrained(root / "first")
    new_model = HealthGPT.from_pretrained(root / "first")
    new_model.save_pretrained(root / "new")
    return root / "old", root / "new", new_model


def _view(directory):
    """What a reader of ``directory`` sees: relative path -> sha256 of every file of every model entry."""
    view = {}
    for name in weights.MODEL_ENTRIES:
        path = weights._entry(str(directory), name)
        files = [path] if os.path.isfile(path) else [os.path.join(d, n) for d, _, ns in os.walk(path) for n in ns]
        for f in files:
            view[os.path.join(name, os.path.relpath(f, path))] = _digest(f)
    return view


def _digest(path):
    """sha256 of a file; of a safetensors file, of its metadata and tensors (the header's metadata
    order varies from one write to the next)."""
    h = hashlib.sha256()
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as f:
            h.update(json.dumps(f.metadata(), sort_keys=True).encode())
            for k in sorted(f.keys()):
                t = f.get_tensor(k)
                h.update(f"{k}{t.dtype}{tuple(t.shape)}".encode() + t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    else:
        with open(path, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Killed(BaseException):
    """Stands for SIGKILL in-process: nothing of the save's own code runs after it."""


def _save_killed_at(model, directory, k, monkeypatch):
    """``save_model`` with the process 'killed' at the k-th file rename (the points where a write
    becomes visible); -> whether the save got that far."""
    real, calls = os.replace, [0]

    def replace(src, dst):
        calls[0] += 1
        if calls[0] == k:
            raise _Killed
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    try:
        weights.save_model(model, directory)
        return False
    except _Killed:
        return True
    finally:
        monkeypatch.setattr(os, "replace", real)


# ---- a save is all or nothing -----------------------------------------------------------------------


def test_save_killed_at_every_rename_leaves_whole_old_or_whole_new_model(saved, tmp_path, monkeypatch):
    old_dir, new_dir, new_model = saved
    old_view, new_view = _view(old_dir), _view(new_dir)
    assert old_view.keys() == new_view.keys() and old_view != new_view
    seen, k = [], 1
    while True:
        target = tmp_path / f"k{k}"
        shutil.copytree(old_dir, target)
        if not _save_killed_at(new_model, target, k, monkeypatch):
            break  # the save ran to the end: every rename point was tried
        view = _view(target)
        assert view in (old_view, new_view), f"killed at rename {k}: a mix of the old and the new model"
        seen.append("old" if view == old_view else "new")
        weights.save_model(new_model, target)  # the next save recovers and completes
        assert _view(target) == new_view and not os.path.exists(target / weights.SAVING_DIR)
        k += 1
    assert "old" in seen and "new" in seen and k > 8  # kills before and after the commit point were tried


def test_load_after_kill_mid_install_gives_the_new_model(saved, tmp_path, monkeypatch):
    """A real load (not only the file view) after a kill between the moves of the install."""
    old_dir, new_dir, new_model = saved
    expected = _state(new_model)
    target = tmp_path / "w"
    shutil.copytree(old_dir, target)
    # the commit: the first kill point after which readers see the new model; then kill two renames later
    for k in range(1, 40):
        probe = tmp_path / f"probe{k}"
        shutil.copytree(old_dir, probe)
        assert _save_killed_at(new_model, probe, k, monkeypatch)
        if _view(probe) == _view(new_dir):
            break
    shutil.rmtree(target)
    shutil.copytree(old_dir, target)
    assert _save_killed_at(new_model, target, k + 2, monkeypatch)
    assert (target / weights.SAVING_DIR / weights.COMMIT_FILE).is_file()  # the move was half done
    assert _same_state(_state(HealthGPT.from_pretrained(target)), expected)


def test_os_exit_before_commit_keeps_the_old_model_loadable(saved, tmp_path):
    """A real kill (os._exit in a child process) just before the commit file's rename."""
    old_dir, new_dir, _ = saved
    target = tmp_path / "w"
    shutil.copytree(old_dir, target)
    script = textwrap.dedent(f"""
        import os
        from hlora import files
        from healthgpt import HealthGPT
        model = HealthGPT.from_pretrained({str(new_dir)!r})
        real = os.replace
        def replace(src, dst):
            if os.path.basename(dst) == "COMPLETE":
                os._exit(9)
            real(src, dst)
        os.replace = replace
        model.save_pretrained({str(target)!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 9, result.stderr[-2000:]
    assert (target / weights.SAVING_DIR).is_dir()  # the new model was written, not committed
    loaded, old = _state(HealthGPT.from_pretrained(target)), _state(HealthGPT.from_pretrained(old_dir))
    assert _same_state(loaded, old)


# ---- damaged files: one line naming the file or tensor ----------------------------------------------


def _copy(saved, tmp_path):
    target = tmp_path / "w"
    shutil.copytree(saved[0], target)
    return target


@pytest.mark.parametrize("name", ["projectors.safetensors", "plugins/hlora_model.safetensors",
                                  "image_tokenizer/model.safetensors"])
def test_truncated_or_empty_safetensors_is_named(saved, tmp_path, name):
    target = _copy(saved, tmp_path)
    path = target / name
    data = path.read_bytes()
    for content in (data[: len(data) // 2], b""):
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=name.split("/")[-1]) as info:
            HealthGPT.from_pretrained(target)
        assert "\n" not in str(info.value)


def test_empty_or_invalid_tokenizer_and_config_json_is_named_with_line_and_column(saved, tmp_path):
    target = _copy(saved, tmp_path)
    tok = target / "tokenizer" / "tokenizer_config.json"
    tok.write_text("")
    with pytest.raises(CheckpointError, match="tokenizer_config.json is empty"):
        HealthGPT.from_pretrained(target)
    tok.write_text('{\n  "a": 1,\n  "b": \n}')
    with pytest.raises(CheckpointError, match=r"tokenizer_config.json is not valid JSON: .* line 4, column 1"):
        HealthGPT.from_pretrained(target)
    (target / CONFIG_NAME).write_text('{\n "template": "phi3",,\n}')
    with pytest.raises(CheckpointError, match=rf"{CONFIG_NAME} is not valid JSON: .* line 2, column 21"):
        HealthGPT.from_pretrained(target)


@pytest.mark.parametrize("bad", ["nan", "inf", "int"])
def test_nan_inf_or_integer_weights_are_refused_naming_the_tensor(saved, tmp_path, bad):
    target = _copy(saved, tmp_path)
    path = target / "projectors.safetensors"
    tensors = load_file(path)
    key = sorted(tensors)[1]
    t = tensors[key].clone()
    if bad == "int":
        t = t.round().to(torch.int32)
    else:
        t.view(-1)[3] = float(bad)
    tensors[key] = t
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=rf"{'dtype mismatch' if bad == 'int' else 'NaN/Inf'}.*{key}"):
        HealthGPT.from_pretrained(target)


def test_text_file_as_release_bin_is_a_clear_error_and_never_unpickled(saved, tmp_path):
    model = HealthGPT.from_pretrained(saved[0])
    text = tmp_path / "com_hlora_weights.bin"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="com_hlora_weights.bin"):
        model.load_release_weights(com=str(text))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        model.load_release_weights(com=str(tmp_path / "evil.bin"))
    assert not marker.exists()


def test_unfinished_training_run_as_weights_says_how_to_resume(saved, tmp_path):
    target = _copy(saved, tmp_path)  # an earlier model, then a new run started in the same folder and was killed
    (target / "run_config.json").write_text(json.dumps({"stage": 1}))
    with pytest.raises(CheckpointError, match="unfinished training run.*--resume"):
        HealthGPT.from_pretrained(target)
    (target / "stage.json").write_text(json.dumps({"complete": True}))
    HealthGPT.from_pretrained(target)  # finished: loads


# ---- hlora checkpoints ------------------------------------------------------------------------------


def _plugged(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 7))
    hlora.inject(model, hlora.HLoRAConfig(plugins=PLUGINS, target_modules=["0", "2"]))
    with torch.no_grad():
        for p in hlora.trainable_parameters(model).values():
            p.copy_(torch.randn(p.shape) * 0.1)
    return model


def test_hlora_load_of_truncated_file_raises_checkpoint_error(tmp_path):
    hlora.save(_plugged(), tmp_path / "c")
    path = tmp_path / "c" / hlora.io.WEIGHTS_NAME
    data = path.read_bytes()
    fresh = _plugged(1)
    before = _state(fresh)
    for content in (data[:-7], data[:5], b""):
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=hlora.io.WEIGHTS_NAME):
            hlora.load(fresh, tmp_path / "c")
        assert _same_state(_state(fresh), before)


@pytest.mark.parametrize("bad", ["nan", "-inf", "int"])
def test_hlora_checkpoint_with_nan_inf_or_integer_tensor_is_refused_by_name(tmp_path, bad):
    hlora.save(_plugged(), tmp_path / "c")
    path = tmp_path / "c" / hlora.io.WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = sorted(tensors)[2]
    tensors[key] = tensors[key].round().to(torch.int64) if bad == "int" else tensors[key].index_fill(-1, torch.tensor([0]), float(bad))
    save_file(tensors, str(path), metadata=meta)
    fresh = _plugged(1)
    before = _state(fresh)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        hlora.load(fresh, tmp_path / "c")
    assert _same_state(_state(fresh), before)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):  # into a model without plugins too
        hlora.load(nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 7)), tmp_path / "c")


def test_hlora_load_add_into_merged_model_refused_and_unmerge_restores_exact_base(tmp_path):
    source = _plugged(3)
    hlora.save(source, tmp_path / "c")
    model = _plugged(4)
    base = {k: v.clone() for k, v in model.state_dict().items() if ".plugins." not in k}
    hlora.set_task(model, "comp")
    hlora.merge(model, "comp")
    merged = _state(model)
    with pytest.raises(CheckpointError, match="merged"):
        hlora.load(model, tmp_path / "c")
    with pytest.raises(CheckpointError, match="merged"):
        hlora.load(model, tmp_path / "c", plugins=["gen"], rename={"gen": "other"})
    with pytest.raises(RuntimeError, match="merged"):
        hlora.add_plugin(model, "third", hlora.PluginConfig(rank=2, num_experts=2, alpha=2))
    assert _same_state(_state(model), merged)
    hlora.unmerge(model)
    after = {k: v for k, v in model.state_dict().items() if ".plugins." not in k}
    assert after.keys() == base.keys()
    for k in base:  # unmerge subtracts exactly what merge added: within float rounding of the base
        torch.testing.assert_close(after[k], base[k], rtol=0, atol=1e-6)
    hlora.load(model, tmp_path / "c")  # unmerged: loads
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items() if ".plugins." in k)
