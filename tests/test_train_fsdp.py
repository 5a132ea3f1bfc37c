"""FSDP2 on real processes (torchrun, gloo, CPU): sharded storage, the same training as one process,
kill and resume, the gathered save in our normal format, bf16 dtypes. One 2-process launch: its
first attempt saves a sharded checkpoint and kills itself; torchrun restarts it (``--max-restarts
1``), and the fresh processes resume from the checkpoint, then run the uninterrupted fp32 run and
the bf16 run. The single-process reference trains in the test process while the workers start."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from healthgpt.model.healthgpt import HealthGPT
from healthgpt.training import fsdp

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, SAVE_AT, LR = 2, 1, 1e-2  # the resumed step needs the checkpoint's Adam state to match

# The model, batches and optimizer, shared by the workers and the single-process reference (which
# runs this same text), so both sides train the same thing.
COMMON = textwrap.dedent("""
    import torch, hlora
    from healthgpt.constants import IMAGE_TOKEN_INDEX
    from healthgpt.model.config import TINY_VQ, HealthGPTConfig
    from healthgpt.model.healthgpt import HealthGPT

    TASKS = ["comp", "gen", "gen", "comp"]  # each rank of two gets one of each: routing is per sample

    def build():
        torch.manual_seed(0)
        model = HealthGPT(HealthGPTConfig.preset("tiny", image_tokenizer_config=dict(TINY_VQ, resolution=32)))
        model.set_trainable(plugins=("comp", "gen"), projectors=("comp", "gen"))
        for layer in hlora.adapter_layers(model.llm):
            for plugin in layer.plugins.values():
                plugin.dropout = 0.0  # random masks would differ between one process and two
        model.activation_checkpointing_enable()  # the recompute must see the per-sample routing
        return model.train()

    def batch(step, model):
        g = torch.Generator().manual_seed(100 + step)
        P, T = model.num_image_tokens, 7 + step
        ids = torch.randint(3, 30000, (4, T + 2 + P), generator=g)
        ids[:, 1:1 + P] = IMAGE_TOKEN_INDEX
        labels = ids.clone()
        labels[:, :2 + P] = -100
        images = torch.randn(4, 3, 56, 56, generator=g)
        return ids, labels, images

    def optimizer(model):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=%r)
""" % LR)

WORKER = COMMON + textwrap.dedent("""
    import json, os, signal, sys
    import torch.distributed as dist
    from safetensors.torch import save_file
    from healthgpt.training import fsdp

    out, steps, save_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    torch.set_num_threads(1)
    # the restarted ranks reuse torchrun's store, where the dead ranks' gloo addresses are still
    # published: a prefix per attempt keeps them apart
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt-{attempt}", store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    rank, world = dist.get_rank(), dist.get_world_size()
    share = slice(rank * 4 // world, (rank + 1) * 4 // world)
    ckpt = os.path.join(out, "ckpt")

    def train(model, opt, start, stop, report, kill_at=None):
        for step in range(start, stop):
            if step == kill_at:
                fsdp.save_sharded(model, opt, ckpt)
                os.kill(os.getpid(), signal.SIGKILL)  # no clean exit: the checkpoint must stand on its own
            ids, labels, images = batch(step, model)
            loss = model(input_ids=ids[share], images=images[share], tasks=TASKS[share], labels=labels[share]).loss
            loss.backward()
            if "dtypes" in report and step == start:
                layer = hlora.adapter_layers(model.llm)[0]
                report["dtypes"].update(sharded=str(layer.plugins["gen"].A.dtype), grad=str(layer.plugins["gen"].A.grad.dtype))
            opt.step()
            opt.zero_grad()
            mean = loss.detach().float().clone()
            dist.all_reduce(mean)
            report["losses"].append(mean.item() / world)

    def save_trained(model, name):  # gathered to rank 0: the trained parameters only
        state = fsdp.gather_state_dict(model)
        if rank == 0:
            trained = {k: v for k, v in state.items() if ".plugins." in k or k.startswith("projectors.")}
            save_file({k: v.contiguous() for k, v in trained.items()}, os.path.join(out, name))
        return state

    if attempt == 0:  # trains to save_at, checkpoints and dies
        model = fsdp.shard_model(build())
        train(model, optimizer(model), 0, steps, {"losses": []}, kill_at=save_at)
        raise SystemExit("the first attempt must have been killed at its checkpoint")

    # the restart: fresh processes, only the checkpoint on disk from the killed ones
    report = {"attempt": attempt, "left": sorted(os.listdir(out))}
    model = fsdp.shard_model(build())
    opt = optimizer(model)
    fsdp.load_sharded(model, opt, ckpt)
    report["resumed"] = {"losses": []}
    train(model, opt, save_at, steps, report["resumed"])
    save_trained(model, "trained-resumed.safetensors")

    # the uninterrupted fp32 run
    model = fsdp.shard_model(build())
    report.update(sizes=fsdp.shard_sizes(model), cls=type(model).__name__, losses=[])
    train(model, optimizer(model), 0, steps, report)
    state = save_trained(model, "trained.safetensors")
    if rank == 0:  # our normal format, from a fresh copy of the starting model
        fresh = build()
        fresh.load_state_dict(state)
        fresh.save_pretrained(os.path.join(out, "model"))

    # the same steps in bf16: what the forward computes in, what the optimizer keeps
    model = fsdp.shard_model(build(), mixed_precision="bf16")
    seen = {}

    def record(layer, args):  # the first call: the gathered unit inside the forward
        seen.setdefault("compute", dict(plugin=str(layer.plugins["gen"].A.dtype), base=str(layer.base_weight.dtype),
                                        input=str(args[0].dtype)))

    hlora.adapter_layers(model.llm)[0].register_forward_pre_hook(record)
    report["bf16"] = {"losses": [], "dtypes": seen}
    train(model, optimizer(model), 0, steps, report["bf16"])
    save_trained(model, "trained-bf16.safetensors")
    with open(os.path.join(out, f"report-{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()
""")


def _reference(scope):
    """One process, the whole global batch of 4 per step, plain fp32: losses and trained weights."""
    model = scope["build"]()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = scope["optimizer"](model)
    losses = []
    for step in range(STEPS):
        ids, labels, images = scope["batch"](step, model)
        loss = model(input_ids=ids, images=images, tasks=scope["TASKS"], labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    trained = {k: v.detach().clone() for k, v in model.state_dict().items() if ".plugins." in k or k.startswith("projectors.")}
    return {"losses": losses, "trained": trained, "start": start}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The 2-process launch (killed once, restarted) and, meanwhile, the single-process reference."""
    tmp = tmp_path_factory.mktemp("fsdp")
    out = tmp / "out"
    out.mkdir()
    script = tmp / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts", "1",
           str(script), str(out), str(STEPS), str(SAVE_AT)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        scope = {}
        exec(COMMON, scope)
        reference = _reference(scope)
        log = proc.communicate(timeout=400)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, log[-6000:]
    reports = [json.load(open(out / f"report-{r}.json")) for r in (0, 1)]
    return {"out": out, "reports": reports, "reference": reference}


def _worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _close(a: list, b: list, tol: float) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < tol


def test_each_rank_holds_half_and_training_matches_one_process(run):
    reports, reference = run["reports"], run["reference"]
    assert all(r["cls"] == "FSDPHealthGPT" for r in reports)
    sizes = [r["sizes"] for r in reports]
    assert sizes[0]["full"] == sizes[1]["full"] == sum(v.numel() for v in reference["start"].values())
    assert all(s["unsharded"] == 0 for s in sizes)  # every parameter, frozen or trainable, is sharded
    assert sizes[0]["local"] + sizes[1]["local"] == sizes[0]["full"]
    for s in sizes:  # dim-0 shards: about half each (uneven first dims leave a few rows over)
        assert abs(s["local"] / s["full"] - 0.5) < 0.01, s

    for r in reports:
        assert _close(r["losses"], reference["losses"], 1e-4), (r["losses"], reference["losses"])
    trained = load_file(run["out"] / "trained.safetensors")
    assert _worst(trained, reference["trained"]) < 1e-4
    moved = _worst(trained, {k: reference["start"][k] for k in trained})
    assert moved > 1e-3  # both plugins and projectors did train
    for task in ("comp", "gen"):
        b = [k for k in trained if f".plugins.{task}." in k and k.endswith(".B")]
        assert b and max(trained[k].abs().max().item() for k in b) > 1e-3, f"plugin {task} did not train"


def test_gathered_save_loads_on_one_process(run):
    loaded = HealthGPT.from_pretrained(str(run["out"] / "model"))
    trained = load_file(run["out"] / "trained.safetensors")
    state, start = loaded.state_dict(), run["reference"]["start"]
    assert state.keys() == start.keys()
    assert _worst(trained, {k: state[k] for k in trained}) == 0.0
    frozen = [k for k in state if k not in trained]
    assert len(frozen) > 100  # the base weights came back whole from their shards, unchanged
    assert _worst({k: state[k] for k in frozen}, {k: start[k] for k in frozen}) == 0.0


def test_kill_and_resume_ends_like_the_uninterrupted_run(run):
    for r in run["reports"]:
        assert r["attempt"] == 1  # torchrun restarts only a failed attempt: the first one really died
        assert r["left"] == ["ckpt"]  # what the killed attempt left: a whole checkpoint, no staging folder, no weights
        assert _close(r["resumed"]["losses"], r["losses"][SAVE_AT:], 1e-6), (r["resumed"]["losses"], r["losses"])
    resumed = load_file(run["out"] / "trained-resumed.safetensors")
    assert _worst(resumed, load_file(run["out"] / "trained.safetensors")) < 1e-6
    assert _worst(resumed, {k: run["reference"]["start"][k] for k in resumed}) > 1e-3  # not the starting point


def test_bf16_computes_in_bf16_and_keeps_fp32_master_weights(run):
    for r in run["reports"]:
        d = r["bf16"]["dtypes"]
        assert d["compute"] == {"plugin": "torch.bfloat16", "base": "torch.bfloat16", "input": "torch.bfloat16"}
        assert d["sharded"] == d["grad"] == "torch.float32"  # master weights and their reduced gradients
        assert _close(r["bf16"]["losses"], run["reference"]["losses"], 5e-2)  # bf16 rounding only
    trained = load_file(run["out"] / "trained-bf16.safetensors")
    assert all(v.dtype == torch.float32 for v in trained.values())
    assert 0 < _worst(trained, run["reference"]["trained"]) < 5e-2


def test_fsdp_refuses_a_single_process():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(fsdp.FSDPError, match="torchrun"):
        fsdp.shard_model(model)
    assert not fsdp.is_sharded(model)
