"""A real 2-process run (torchrun, gloo, CPU) matches one process with the same global batch."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file

from healthgpt.model.config import TINY_VQ
from healthgpt.training.run import TrainArguments, train_stage

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend on a shared CPU

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = {"image_tokenizer_config": dict(TINY_VQ, resolution=32)}
# Stage 3 mixed: both plugins and projectors train, batches mix tasks, samples differ in length
# (the loss is a token sum over the global token count, so the split over processes must not matter).
# Dropout off: its random masks would differ between one process and two.
RUN = dict(stage=3, task="mixed", preset="tiny", max_steps=3, global_batch_size=4, dropout=0.0, save_steps=2,
           logging_steps=1, seed=0)

WORKER = textwrap.dedent("""
    import json, sys
    from healthgpt.model.config import TINY_VQ
    from healthgpt.training.run import TrainArguments, train_stage

    out, data, cache, run = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    train_stage(TrainArguments(data=data, output=out, cache_dir=cache, per_device_batch_size=2, **run),
                model_overrides={"image_tokenizer_config": dict(TINY_VQ, resolution=32)}, quiet=True)
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(training_subset):
    return training_subset(6)


def _weights(out):
    tensors = {}
    for name in ("projectors.safetensors", os.path.join("plugins", "hlora_model.safetensors"), "fusion.safetensors"):
        tensors.update({f"{name}:{k}": v for k, v in load_file(os.path.join(out, name)).items()})
    return tensors


def test_two_processes_match_one(env, tmp_path):
    two = tmp_path / "two"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    envvars = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(two), env["data"], env["cache"], json.dumps(RUN)]
    proc = subprocess.run(cmd, cwd=REPO, env=envvars, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    info = json.load(open(two / "stage.json"))
    assert info["processes"] == 2 and info["per_device_batch_size"] == 2 and info["gradient_accumulation"] == 1
    # both ranks wrote into the staged checkpoint before it was renamed into place
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainable.safetensors"} <= set(os.listdir(two / "checkpoint-2"))
    assert not [n for n in os.listdir(two) if n.startswith(".staging")]

    one = tmp_path / "one"
    res = train_stage(TrainArguments(data=env["data"], output=str(one), cache_dir=env["cache"], per_device_batch_size=4,
                                     **RUN), model_overrides=MICRO, quiet=True)
    assert res.summary["processes"] == 1

    a, b = _weights(str(one)), _weights(str(two))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, f"2-process run differs from 1 process by {worst}"
    plugin_b = [k for k in a if k.endswith(".B")]
    assert max(a[k].abs().max().item() for k in plugin_b) > 1e-4  # it did train
    losses_two = [json.loads(line)["loss"] for line in open(two / "loss_log.jsonl")]
    assert all(abs(x - y) < 1e-4 for x, y in zip(losses_two, [r["loss"] for r in res.losses]))
