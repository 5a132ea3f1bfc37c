"""DeepSpeed ZeRO-2 and ZeRO-3 through ``healthgpt train --deepspeed`` (the HF Trainer's DeepSpeed).

``HealthGPT.run_every_part`` (set by ``--deepspeed``): ZeRO reduces gradients in buckets filled in
the order the backward produces them, and ZeRO-3 gathers each module's weights as it runs (a
collective), so every process must run every part and produce every trainable parameter's
gradient, in the same order, whatever the tasks of its micro-batch. Checked on the tiny model: the
post-accumulation hook order of a one-task batch equals a mixed batch's and a batch without images
(the vision tower runs there too), and differs without the flag (which is what aborted ZeRO-2); the
idle task's plugin and projector get zero gradients (not None); the loss and the used parameters'
gradients are the run without the flag's.

Then one 2-process launch (torchrun, gloo, ``DS_ACCELERATOR=cpu``: the code path of a GPU cluster
with gloo for NCCL) of stage 3, mixed tasks routed per sample, both plugins and the projectors
training, 2 micro-batches accumulated per step, from a saved model (``--init``): a ZeRO-3 run saving
every step, killed (SIGKILL) once checkpoint-1 is written and resumed by the restarted processes;
then ZeRO-2, and ZeRO-3 with activation checkpointing. The single-process reference (same global batch, no DeepSpeed)
trains in the test process meanwhile. Checked: ZeRO-3 built and loaded the model partitioned
(``zero.Init``: the new vocabulary rows written through a gather, the H-LoRA layers' shapes and
their plugins registered to be gathered with them), each rank holds about half of every
parameter (the local partitions' sizes, ``ds_tensor``) and of the optimizer state, losses and
final weights equal one process, the final save (gathered) loads with ``HealthGPT.from_pretrained``
on one process, and the resumed run ends with the uninterrupted ZeRO-3 run's loss and weights. deepspeed is a test dependency (``.ci/run`` installs it): without it the launch
test fails, saying how to install it."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import hlora
from healthgpt import HealthGPT, HealthGPTConfig
from healthgpt.cli.train import parse_train_arguments
from healthgpt.model.config import TINY_VQ, _plugins
from healthgpt.training.distributed import CONFIGS_DIR
from healthgpt.training.run import DEEPSPEED_INSTALL, train_stage
from healthgpt.training.trainer import read_loss_log

pytestmark = pytest.mark.usefixtures("one_thread")

COMP_CONV = [{"from": "human", "value": "<image>\nWhat organ is shown?"}, {"from": "gpt", "value": "The liver."}]
GEN_CONV = [{"from": "human", "value": "<image>\nConvert this CT to an MRI."}]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = HealthGPT(HealthGPTConfig.preset("tiny", plugins=_plugins(8, 16, dropout=0.0)))
    with torch.no_grad():  # B starts at zero: make every plugin path carry gradient to A and the router
        for layer in hlora.adapter_layers(m.llm):
            for p in layer.plugins.values():
                p.B.normal_(0, 0.05)
    return m.train()


TEXT_CONV = [{"from": "human", "value": "Which organ filters blood?"}, {"from": "gpt", "value": "The kidney."}]


def _batch(model, tasks, seed):
    samples = []
    for i, t in enumerate(tasks):
        if t == "text":  # a comprehension sample without an image: no projector runs
            samples.append(model.prepare_sample(TEXT_CONV, "comp"))
            continue
        rng = np.random.default_rng(seed + i)
        image = Image.fromarray(rng.integers(0, 256, (37, 29, 3), dtype=np.uint8))
        if t == "comp":
            samples.append(model.prepare_sample(COMP_CONV, "comp", image=image))
        else:
            codes = torch.randint(0, model.num_image_codes, (model.num_image_codes,),
                                  generator=torch.Generator().manual_seed(seed + i))
            samples.append(model.prepare_sample(GEN_CONV, "gen", image=image, target=codes))
    return model.collate(samples)


def _backward(model, batch, every_part):
    """-> (loss, names in gradient-ready order (and "vision" where the vision tower ran), {name: grad or None})."""
    model.run_every_part = every_part
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    order, hooks = [], [p.register_post_accumulate_grad_hook(lambda p, n=n: order.append(n)) for n, p in params.items()]
    hooks.append(model.vision.register_forward_hook(lambda *_: order.append("vision")))
    try:
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
    finally:
        model.run_every_part = False
        for h in hooks:
            h.remove()
    return loss.detach(), order, {n: None if p.grad is None else p.grad.clone() for n, p in params.items()}


def test_every_process_produces_every_gradient_in_the_same_order(model):
    one_task, mixed = _batch(model, ["gen", "gen"], seed=3), _batch(model, ["comp", "gen"], seed=11)
    idle = [n for n, _ in model.named_parameters() if ".plugins.comp." in n or n.startswith("projectors.comp.")]
    assert idle

    loss_ref, order_one, grads_ref = _backward(model, one_task, every_part=False)
    _, order_mixed, _ = _backward(model, mixed, every_part=False)
    assert all(grads_ref[n] is None for n in idle)  # what made ZeRO-2's buckets differ
    assert order_one != order_mixed

    loss, order_one, grads = _backward(model, one_task, every_part=True)
    _, order_mixed, grads_mixed = _backward(model, mixed, every_part=True)
    assert order_one == order_mixed and sorted(order_one) == sorted([*grads, "vision"])  # each once, same order
    _, order_text, grads_text = _backward(model, _batch(model, ["text", "text"], seed=5), every_part=True)
    # no image anywhere: the vision tower still runs (ZeRO-3 gathers its weights: a collective), the projectors on zero rows
    assert order_text == order_mixed
    assert _backward(model, _batch(model, ["text", "text"], seed=5), every_part=False)[1].count("vision") == 0
    assert all(not grads_text[n].any() for n in grads_text if n.startswith("projectors."))
    assert all(g is not None and torch.isfinite(g).all() for g in grads_mixed.values())
    for n in idle:
        assert grads[n] is not None and not grads[n].any(), n
    assert torch.isfinite(loss) and torch.allclose(loss, loss_ref, rtol=1e-6, atol=0)
    for n, g in grads_ref.items():
        if g is not None:
            assert g.abs().max() > 0, n
            assert torch.allclose(grads[n], g, rtol=1e-4, atol=1e-6 * g.abs().max().item()), n


# ---- the 2-process launch -------------------------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2
SAVE_AT = 1  # the killed attempt's last checkpoint
# `healthgpt train` flags shared by the workers and the reference. Dropout off: its random masks would
# differ between one process and two; no warm-up: the first step already moves the weights, so the
# second step's loss checks the first update.
FLAGS = ["--stage", "3", "--task", "mixed", "--preset", "tiny", "--max-steps", str(STEPS), "--global-batch-size", "8",
         "--dropout", "0", "--lr", "1e-2", "--projector-lr", "1e-2", "--warmup-ratio", "0", "--save-steps", "100",
         "--logging-steps", "1", "--seed", "0"]
# 2 per device on 2 processes: each step accumulates 2 micro-batches, some of one task, some mixed
RUNS = {"zero2": ["--deepspeed", os.path.join(CONFIGS_DIR, "zero2.json"), "--per-device-batch-size", "2"],
        "zero3": ["--deepspeed", os.path.join(CONFIGS_DIR, "zero3.json"), "--per-device-batch-size", "2",
                  "--gradient-checkpointing"]}

WORKER = textwrap.dedent("""
    import json, math, os, signal, sys
    import torch
    import torch.distributed as dist
    from transformers import TrainerCallback, TrainingArguments
    import hlora
    from hlora.zero3 import full_shape, gathered, is_partitioned
    from healthgpt import HealthGPT, HealthGPTConfig
    from restartable_group import init_process_group_for_this_attempt  # tests/, on PYTHONPATH
    from healthgpt.cli.train import parse_train_arguments
    from healthgpt.model.config import TINY_VQ
    from healthgpt.training.run import start_deepspeed_comm, train_stage

    out, data, cache, init = sys.argv[1:5]
    flags, runs, save_at = json.loads(sys.argv[5]), json.loads(sys.argv[6]), int(sys.argv[7])
    torch.set_num_threads(1)
    attempt = init_process_group_for_this_attempt()
    rank = dist.get_rank()

    def registered(layer):  # what ZeRO-3 gathers with the layer besides its own weight and bias
        return {id(p) for _, p in layer.ds_external_parameters()} if hasattr(layer, "ds_external_parameters") else set()

    def plugins_registered(model):
        return all({id(p) for p in layer.plugins.parameters()} <= registered(layer) for layer in hlora.adapter_layers(model.llm))

    class Probe(TrainerCallback):
        def __init__(self, kill_at=None):
            self.kill_at, self.report = kill_at, {"steps": 0}

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == self.kill_at:  # checkpoint-<kill_at> is complete: die without a clean exit
                os.kill(os.getpid(), signal.SIGKILL)
            self.report["steps"] += 1

        def on_init_end(self, args, state, control, model=None, **kwargs):
            # as train_stage built (and loaded) it, before deepspeed.initialize partitions the rest
            base = {n: p for n, p in model.named_parameters() if n.startswith(("llm.", "vision.")) and ".plugins." not in n}
            self.report["built"] = {"whole": sorted(n for n, p in base.items() if not is_partitioned(p)), "of": len(base),
                                    "plugins_registered": plugins_registered(model)}

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            params = list(model.parameters())
            if all(map(is_partitioned, params)):  # ZeRO-3: every parameter is a partition per rank
                self.report["params"] = {"local": sum(p.ds_tensor.numel() for p in params),
                                         "full": sum(p.ds_numel for p in params), "whole": sum(p.numel() for p in params)}
            zero = optimizer.optimizer  # accelerate's wrapper -> DeepSpeed's ZeRO optimizer
            flat = getattr(zero, "single_partition_of_fp32_groups", None) or zero.fp32_partitioned_groups_flat
            self.report["optimizer"] = {"type": type(zero).__name__, "local": sum(t.numel() for t in flat),
                                        "full": sum(math.prod(full_shape(p)) for p in params if p.requires_grad)}

    def run(name, engine, *extra, kill_at=None):
        parsed = parse_train_arguments(flags + runs[engine] + ["--data", data, "--cache-dir", cache, "--init", init,
                                                              "--output", os.path.join(out, name), *extra])
        probe = Probe(kill_at)
        train_stage(parsed, callbacks=[probe], quiet=True)
        return probe.report

    if attempt == 0:  # ZeRO-3 saving every step, killed once checkpoint-<save_at> is written
        run("resumed", "zero3", "--save-steps", "1", kill_at=save_at)
        raise SystemExit("the first attempt must have been killed at its checkpoint")

    # the restart: fresh processes, only what the killed ones left on disk
    report = {"attempt": attempt, "left": sorted(os.listdir(os.path.join(out, "resumed")))}
    report["resumed"] = run("resumed", "zero3", "--save-steps", "1", "--resume")
    # healthgpt train under ZeRO-3 without --init: transformers builds the LLM and CLIP under zero.Init
    zero3 = runs["zero3"][runs["zero3"].index("--deepspeed") + 1]
    targs = TrainingArguments(output_dir=os.path.join(out, "build"), deepspeed=zero3, use_cpu=True, ddp_backend="gloo",
                              report_to="none")
    start_deepspeed_comm()
    model = HealthGPT(HealthGPTConfig.preset("tiny", image_tokenizer_config=dict(TINY_VQ, resolution=32)))
    emb = model.llm.get_input_embeddings().weight
    with gathered([emb]):
        rows = emb.detach().clone()
    base_rows = model.gen_vocab.base_size
    layers = hlora.adapter_layers(model.llm)
    base = {n: p for n, p in model.named_parameters() if n.startswith(("llm.", "vision.")) and ".plugins." not in n}
    report["build"] = {
        "whole": sorted(n for n, p in base.items() if not is_partitioned(p) or p.numel()), "of": len(base),
        "rows": rows.shape[0], "vocab": len(model.tokenizer),
        "new_rows_off_mean": (rows[base_rows:] - rows[:base_rows].mean(0)).abs().max().item(),
        "old_rows_std": rows[:base_rows].std().item(),
        "shapes": all([l.out_features, l.in_features] == list(full_shape(l.weight)) for l in layers),
        "plugin_shapes": all(list(l.plugins["gen"].A.shape) == [l.plugins["gen"].rank, l.in_features] for l in layers),
        "plugins_registered": plugins_registered(model),
    }
    gen = {id(p) for p in layers[0].plugins["gen"].parameters()}
    layers[0].remove_plugin("gen")  # no longer gathered with the layer; "comp" still is
    report["build"]["removed_unregistered"] = not gen & registered(layers[0]) and plugins_registered(model)
    del model, targs

    for name in runs:
        report[name] = run(name, name)
    with open(os.path.join(out, f"report-{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def launch(training_subset, tmp_path_factory):
    """The starting model, the 2-process launch (ZeRO-2, then ZeRO-3) and, meanwhile, the single-process reference."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.fail(f"deepspeed is not installed: this test runs ZeRO-2 and ZeRO-3 on 2 CPU processes ({DEEPSPEED_INSTALL}; "
                    f"CI's .ci/run does)")
    env = training_subset(4)
    tmp = tmp_path_factory.mktemp("deepspeed")
    transformers.set_seed(0)
    start = HealthGPT(HealthGPTConfig.preset("tiny", image_tokenizer_config=dict(TINY_VQ, resolution=32)))
    with torch.no_grad():  # B starts at zero: make every plugin path carry gradient to A and the router from step 1
        for layer in hlora.adapter_layers(start.llm):
            for p in layer.plugins.values():
                p.B.normal_(0, 0.05)
    init = start.save_pretrained(str(tmp / "init"))
    out = tmp / "out"
    out.mkdir()
    script = tmp / "worker.py"
    script.write_text(WORKER)
    penv = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests"), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1",
            "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts", "1",
           str(script), str(out), env["data"], env["cache"], init, json.dumps(FLAGS), json.dumps(RUNS), str(SAVE_AT)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=penv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:  # its own VQ cache: the workers write theirs meanwhile
        one = tmp / "one"
        train_stage(parse_train_arguments([*FLAGS, "--per-device-batch-size", "8", "--data", env["data"], "--init", init,
                                           "--cache-dir", str(tmp / "cache-one"), "--output", str(one)]), quiet=True)
        log = proc.communicate(timeout=480)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, log[-6000:]
    return {"out": out, "one": one, "init": init, "reports": [json.load(open(out / f"report-{r}.json")) for r in (0, 1)]}


def _state(path) -> dict:
    return {k: v.detach().clone() for k, v in HealthGPT.from_pretrained(str(path)).state_dict().items()}


def _trained(state: dict) -> dict:
    return {k: v for k, v in state.items() if ".plugins." in k or k.startswith("projectors.")}


def _worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _losses(path) -> list:
    return [(r["step"], r["loss"]) for r in read_loss_log(str(path)) if "loss" in r]


def test_zero3_builds_the_model_partitioned(launch):
    # transformers resizes the vocabulary of a zero.Init model into whole new embedding matrices (their
    # shapes are read elsewhere), which deepspeed.initialize partitions later
    resized = ["llm.lm_head.weight", "llm.model.embed_tokens.weight"]
    for r in launch["reports"]:
        build = r["build"]
        assert build["whole"] == resized and build["of"] > 60  # every other weight of the LLM and CLIP: partitioned
        assert build["rows"] == build["vocab"]
        assert build["old_rows_std"] > 0 and build["new_rows_off_mean"] < 1e-6  # the new rows: the old rows' mean
        assert build["shapes"] and build["plugin_shapes"] and build["plugins_registered"] and build["removed_unregistered"]
        loaded = r["zero3"]["built"]  # --init: built partitioned, then the saved weights copied in through gathers
        assert loaded["whole"] == resized and loaded["of"] == build["of"] and loaded["plugins_registered"]
        assert len(r["zero2"]["built"]["whole"]) == build["of"]  # ZeRO-2 keeps whole parameters


def test_each_rank_holds_half_of_the_parameters_and_of_the_optimizer_state(launch):
    for r in launch["reports"]:
        params = r["zero3"]["params"]
        assert params["full"] == sum(v.numel() for v in _state(launch["init"]).values())
        assert abs(params["local"] / params["full"] - 0.5) < 0.01, params  # each rank's partitions: half (padded)
        assert params["whole"] / params["full"] < 0.05, params  # only the small persistent ones stay whole
        for name in RUNS:
            opt = r[name]["optimizer"]
            assert abs(opt["local"] / opt["full"] - 0.5) < 0.01, (name, opt)
        assert r["zero2"]["optimizer"]["type"] == "DeepSpeedZeroOptimizer"
        assert r["zero3"]["optimizer"]["type"] == "DeepSpeedZeroOptimizer_Stage3"


@pytest.mark.parametrize("name", list(RUNS))
def test_training_matches_one_process_and_the_saved_model_loads(launch, name):
    out, one = launch["out"], launch["one"]
    info = json.load(open(out / name / "stage.json"))
    assert info["processes"] == 2 and info["per_device_batch_size"] == 2 and info["gradient_accumulation"] == 2
    assert info["engine"]["deepspeed"] == RUNS[name][1]
    losses, reference = _losses(out / name), _losses(one)
    assert len(losses) == len(reference) == STEPS and reference[0][1] != reference[1][1]  # the first step moved it
    assert all(s == t and abs(x - y) < 1e-5 for (s, x), (t, y) in zip(losses, reference)), (losses, reference)
    assert all("loss_comp" in r and "loss_gen" in r for r in read_loss_log(str(out / name)))  # both tasks every step
    saved, expected, start = _state(out / name), _state(one), _state(launch["init"])  # the gathered save, one process
    moved = {k: (v - start[k]).abs().max().item() for k, v in _trained(expected).items()}
    assert len(moved) > 40 and min(moved.values()) > 1e-3  # every plugin tensor and projector trained
    assert _worst(_trained(saved), _trained(expected)) < 5e-5
    frozen = [k for k in saved if k not in _trained(saved)]
    assert len(frozen) > 100 and _worst({k: saved[k] for k in frozen}, {k: start[k] for k in frozen}) == 0.0


def test_zero3_killed_after_its_checkpoint_resumes_to_the_uninterrupted_run(launch):
    out = launch["out"]
    for r in launch["reports"]:
        assert r["attempt"] == 1  # torchrun restarts only a failed attempt: the first one really died
        # what the killed attempt left: a whole checkpoint, no staging folder, no final model
        assert r["left"] == [f"checkpoint-{SAVE_AT}", "loss_log.jsonl", "run_config.json"], r["left"]
        assert r["resumed"]["steps"] == STEPS - SAVE_AT
    ckpt = out / "resumed" / f"checkpoint-{SAVE_AT}"
    assert (ckpt / f"global_step{SAVE_AT}").is_dir()  # DeepSpeed's own partitioned model and optimizer state
    info = json.load(open(out / "resumed" / "stage.json"))
    assert info["resumed_from"].endswith(f"checkpoint-{SAVE_AT}") and info["steps"] == STEPS
    assert _losses(out / "resumed")[-1] == _losses(out / "zero3")[-1]
    assert _worst(_trained(_state(out / "resumed")), _trained(_state(out / "zero3"))) < 1e-6
