"""``healthgpt train --fsdp`` (and plain DDP) on real processes (torchrun, gloo, CPU): the CLI's
arguments through ``train_stage`` and the FSDP2 engine. Stage 3, mixed tasks with per-sample
routing, both plugins and projectors training, activation checkpointing on.

One 2-process launch (tests/test_train_deepspeed.py has the other): its first attempt checkpoints at step 1 and is
killed (SIGKILL) as step 2 begins; torchrun restarts it (``--max-restarts 1``), and the fresh
processes ``--resume`` the killed run, then run it uninterrupted, then in bf16, then without
``--fsdp`` (DDP). The single-process reference (same global batch, no sharding, no checkpointing)
trains in the test process while the workers run. Checked: each rank
holds half of every parameter's storage (local shard sizes), losses and final weights equal one
process, the recompute sees the per-sample routing, the resumed run ends with the uninterrupted
run's weights, the gathered save loads with ``HealthGPT.from_pretrained``, bf16 dtypes."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from healthgpt.cli.train import parse_train_arguments
from healthgpt.model.config import TINY_VQ
from healthgpt.model.healthgpt import HealthGPT
from healthgpt.training import fsdp
from healthgpt.training.run import train_stage
from healthgpt.training.trainer import SHARDED_DIR, read_loss_log

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = {"image_tokenizer_config": dict(TINY_VQ, resolution=32)}
STEPS, SAVE_AT = 2, 1
# `healthgpt train` flags shared by the workers and the reference. Dropout off: its random masks would
# differ between one process and two. lr 1e-2: the resumed step needs the checkpoint's Adam state to match.
FLAGS = ["--stage", "3", "--task", "mixed", "--preset", "tiny", "--max-steps", str(STEPS), "--global-batch-size", "8",
         "--dropout", "0", "--lr", "1e-2", "--projector-lr", "1e-2", "--save-steps", "1", "--logging-steps", "1",
         "--seed", "0"]
# 2 per device on 2 processes: each optimizer step accumulates 2 micro-batches (the reduce-scatter waits for the last)
FSDP = ["--fsdp", "--gradient-checkpointing", "--per-device-batch-size", "2"]
ACCUMULATION = 2

WORKER = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    import torch.distributed as dist
    from transformers import TrainerCallback
    import hlora
    from restartable_group import init_process_group_for_this_attempt  # tests/, on PYTHONPATH
    from healthgpt.cli.train import parse_train_arguments
    from healthgpt.model.config import TINY_VQ
    from healthgpt.training import fsdp
    from healthgpt.training.run import train_stage

    out, data, cache, flags, fsdp_flags = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), json.loads(sys.argv[5])
    save_at = int(sys.argv[6])
    torch.set_num_threads(1)
    attempt = init_process_group_for_this_attempt()
    rank = dist.get_rank()

    class Probe(TrainerCallback):
        # What the sharded model holds, what each call of the first adapter layer saw (the forward and
        # the checkpointing recompute), the dtypes of the master weights and gradients
        def __init__(self, kill_at=None):
            self.kill_at, self.report = kill_at, {"steps": []}

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.report.update(sizes=fsdp.shard_sizes(model), cls=type(model).__name__)
            self.report["tensor"] = type(hlora.adapter_layers(model.llm)[0].plugins["gen"].A).__name__
            self.layer = hlora.adapter_layers(model.llm)[0]
            self.layer.register_forward_pre_hook(self.record)

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == self.kill_at:  # checkpoint-<kill_at> is complete: die without a clean exit
                os.kill(os.getpid(), signal.SIGKILL)
            self.report["steps"].append([])

        def record(self, layer, args):
            r = layer.routing
            self.report["steps"][-1].append({
                "routing": None if r is None else [list(r.active), None if r.per_sample is None else r.per_sample.tolist()],
                "plugin": str(layer.plugins["gen"].A.dtype), "base": str(layer.base_weight.dtype), "input": str(args[0].dtype)})

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            a = self.layer.plugins["gen"].A
            self.report.setdefault("master", {"type": type(a).__name__, "param": str(a.dtype), "grad": str(a.grad.dtype)})

    def run(name, *extra, kill_at=None, engine=fsdp_flags):
        parsed = parse_train_arguments(flags + engine + ["--data", data, "--cache-dir", cache,
                                                         "--output", os.path.join(out, name), *extra])
        probe = Probe(kill_at)
        train_stage(parsed, model_overrides={"image_tokenizer_config": dict(TINY_VQ, resolution=32)},
                    callbacks=[probe], quiet=True)
        return probe.report

    if attempt == 0:
        run("resumed", kill_at=save_at)
        raise SystemExit("the first attempt must have been killed at its checkpoint")

    # the restart: fresh processes, only what the killed ones left on disk
    report = {"attempt": attempt, "left": sorted(os.listdir(os.path.join(out, "resumed")))}
    report["resumed"] = run("resumed", "--resume")
    report["fsdp"] = run("fsdp")
    report["bf16"] = run("bf16", "--bf16")
    report["ddp"] = run("ddp", "--per-device-batch-size", "2", engine=[])  # no --fsdp: the Trainer's DDP
    with open(os.path.join(out, f"report-{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def run(training_subset, tmp_path_factory):
    """The 2-process launch (killed once, restarted) and, meanwhile, the single-process reference."""
    env = training_subset(4)
    tmp = tmp_path_factory.mktemp("fsdp")
    out = tmp / "out"
    out.mkdir()
    script = tmp / "worker.py"
    script.write_text(WORKER)
    penv = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests"), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts", "1",
           str(script), str(out), env["data"], env["cache"], json.dumps(FLAGS), json.dumps(FSDP), str(SAVE_AT)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=penv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:  # its own VQ cache: the workers write theirs meanwhile
        one = tmp / "one"
        train_stage(parse_train_arguments([*FLAGS, "--per-device-batch-size", "8", "--data", env["data"],
                                           "--cache-dir", str(tmp / "cache-one"), "--output", str(one)]),
                    model_overrides=MICRO, quiet=True)
        log = proc.communicate(timeout=480)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, log[-6000:]
    reports = [json.load(open(out / f"report-{r}.json")) for r in (0, 1)]
    return {"out": out, "one": one, "reports": reports}


def _state(path) -> dict:
    return {k: v.detach().clone() for k, v in HealthGPT.from_pretrained(str(path)).state_dict().items()}


def _worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _trained(state: dict) -> dict:
    return {k: v for k, v in state.items() if ".plugins." in k or k.startswith("projectors.")}


def _losses(path) -> list:
    return [(r["step"], r["loss"]) for r in read_loss_log(str(path)) if "loss" in r]


def _close(a: list, b: list, tol: float) -> bool:
    return len(a) == len(b) == STEPS and all(s == t and abs(x - y) < tol for (s, x), (t, y) in zip(a, b))


def test_each_rank_holds_half_and_training_matches_one_process(run):
    out, reports = run["out"], run["reports"]
    one = _state(run["one"])
    for r in reports:
        assert r["fsdp"]["cls"] == "FSDPHealthGPT"
        assert r["fsdp"]["master"]["type"] == "DTensor"  # the optimizer steps the sharded parameters
    sizes = [r["fsdp"]["sizes"] for r in reports]
    assert sizes[0]["full"] == sizes[1]["full"] == sum(v.numel() for v in one.values())
    assert all(s["unsharded"] == 0 for s in sizes)  # every parameter, frozen or trainable, is sharded
    assert sizes[0]["local"] + sizes[1]["local"] == sizes[0]["full"]
    for s in sizes:  # dim-0 shards: about half each (uneven first dims leave a few rows over)
        assert abs(s["local"] / s["full"] - 0.5) < 0.01, s

    info = json.load(open(out / "fsdp" / "stage.json"))
    assert info["processes"] == 2 and info["per_device_batch_size"] == 2 and info["engine"]["fsdp"] is True
    assert info["gradient_accumulation"] == ACCUMULATION
    assert _close(_losses(out / "fsdp"), _losses(run["one"]), 1e-5), (_losses(out / "fsdp"), _losses(run["one"]))
    assert all("loss_comp" in r and "loss_gen" in r for r in read_loss_log(str(out / "fsdp")))  # both tasks every step
    sharded = _state(out / "fsdp")  # the gathered save, loaded on one process
    assert _worst(_trained(sharded), _trained(one)) < 1e-5  # measured 1.7e-6 (Adam's step on tiny gradients)
    for task in ("comp", "gen"):
        b = [k for k in sharded if f".plugins.{task}." in k and k.endswith(".B")]  # B starts at zero
        assert b and max(sharded[k].abs().max().item() for k in b) > 1e-3, f"plugin {task} did not train"
    frozen = [k for k in sharded if k not in _trained(sharded) and not k.startswith("fusion")]
    assert len(frozen) > 100  # the base weights came back whole from their shards, as one process has them
    assert _worst({k: sharded[k] for k in frozen}, {k: one[k] for k in frozen}) == 0.0


def test_checkpointing_recompute_sees_the_per_sample_routing(run):
    mixed = single = 0
    for r in run["reports"]:
        steps = r["fsdp"]["steps"]
        assert len(steps) == STEPS
        for calls in steps:  # per micro-batch: the forward, then the recompute in the backward
            assert len(calls) == 2 * ACCUMULATION
            for forward, recompute in zip(calls[::2], calls[1::2]):
                assert forward["routing"] == recompute["routing"] and forward["routing"] is not None
                per_sample = forward["routing"][1]
                mixed += per_sample is not None and len(set(per_sample)) == 2
                single += per_sample is None
    assert mixed >= 1  # some micro-batch held both tasks, each sample routed to its own plugin
    # and some held one task: the other plugin got no gradient on that rank, yet the reduce-scatters matched
    # (fsdp.shard_model's set_reduce_scatter_unused_params) and the weights equal one process
    assert single >= 1
    # (that the recomputed gradients are right: the weights equal a run without checkpointing)


def test_kill_and_resume_ends_like_the_uninterrupted_run(run):
    out = run["out"]
    for r in run["reports"]:
        assert r["attempt"] == 1  # torchrun restarts only a failed attempt: the first one really died
        # what the killed attempt left: a whole checkpoint, no staging folder, no model
        assert r["left"] == ["checkpoint-1", "loss_log.jsonl", "run_config.json"], r["left"]
        assert len(r["resumed"]["steps"]) == STEPS - SAVE_AT
    ckpt = set(os.listdir(out / "resumed" / "checkpoint-1"))
    assert {SHARDED_DIR, "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= ckpt
    assert "trainable.safetensors" not in ckpt and "optimizer.pt" not in ckpt  # the engine's sharded state instead
    assert sorted(os.listdir(out / "resumed" / "checkpoint-1" / SHARDED_DIR))[0] == ".metadata"
    assert json.load(open(out / "resumed" / "run_config.json"))["fsdp"] is True  # only an --fsdp run resumes it
    info = json.load(open(out / "resumed" / "stage.json"))
    assert info["resumed_from"].endswith("checkpoint-1") and info["steps"] == STEPS
    assert _close(_losses(out / "resumed"), _losses(out / "fsdp"), 1e-6)
    resumed, whole = _state(out / "resumed"), _state(out / "fsdp")
    assert _worst(resumed, whole) < 1e-6
    assert _worst(_trained(resumed), _trained(_state(run["one"]))) < 1e-5


def test_bf16_computes_in_bf16_and_keeps_fp32_master_weights(run):
    out = run["out"]
    for r in run["reports"]:
        calls = [c for step in r["bf16"]["steps"] for c in step]
        assert calls and all((c["plugin"], c["base"], c["input"]) == ("torch.bfloat16",) * 3 for c in calls)
        assert r["bf16"]["master"] == {"type": "DTensor", "param": "torch.float32", "grad": "torch.float32"}
        fp32 = [c for step in r["fsdp"]["steps"] for c in step]
        assert all((c["plugin"], c["base"], c["input"]) == ("torch.float32",) * 3 for c in fp32)
    assert _close(_losses(out / "bf16"), _losses(run["one"]), 5e-2)  # bf16 rounding only
    bf16 = _state(out / "bf16")
    assert all(v.dtype == torch.float32 for v in bf16.values())  # saved from the fp32 master weights
    assert 0 < _worst(_trained(bf16), _trained(_state(run["one"]))) < 5e-2


def test_ddp_two_processes_match_one(run):
    """Without --fsdp: the Trainer's DDP over the same processes (find_unused_parameters for the idle task's parts)."""
    out = run["out"]
    for r in run["reports"]:
        assert r["ddp"]["cls"] == "HealthGPT" and r["ddp"]["sizes"]["local"] == 0  # whole parameters, no DTensor
        assert r["ddp"]["tensor"] == "Parameter" and r["fsdp"]["tensor"] == "DTensor"
    info = json.load(open(out / "ddp" / "stage.json"))
    assert info["processes"] == 2 and info["gradient_accumulation"] == ACCUMULATION and info["engine"]["fsdp"] is False
    # both ranks wrote into the staged checkpoint before it was renamed into place
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainable.safetensors"} <= set(os.listdir(out / "ddp" / "checkpoint-2"))
    assert not [n for n in os.listdir(out / "ddp") if n.startswith(".staging")]
    assert _close(_losses(out / "ddp"), _losses(run["one"]), 1e-5)
    ddp, one = _state(out / "ddp"), _state(run["one"])
    assert _worst(_trained(ddp), _trained(one)) < 1e-5
    assert _worst(_trained(ddp), _trained(_state(out / "fsdp"))) < 1e-5  # DDP and FSDP train the same thing


def test_fsdp_refuses_a_single_process():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(fsdp.FSDPError, match="torchrun"):
        fsdp.shard_model(model)
    assert not fsdp.is_sharded(model)
