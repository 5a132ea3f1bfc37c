"""Each stage trains exactly its parts (everything else bit-identical after a step), at its rates."""

import copy
import json
import os

import pytest
import torch
from transformers import TrainerCallback

import hlora
from healthgpt.model.config import TINY_VQ, HealthGPTConfig
from healthgpt.training import STAGE_HPARAMS, TrainArguments, TrainError, apply_stage, plan_stage
from healthgpt.training.run import train_stage

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend on a shared CPU

MICRO = {"image_tokenizer_config": dict(TINY_VQ, resolution=32)}  # 4 x 4 = 16 image tokens: fast on a CPU


@pytest.fixture(scope="module")
def env(training_subset):
    from healthgpt.model.healthgpt import HealthGPT

    subset = training_subset(4)
    torch.manual_seed(0)
    model = HealthGPT(HealthGPTConfig.preset("tiny", **MICRO))
    return {**subset, "model": model}


def _is(name, part):
    kind, _, task = part.partition(".")
    if kind == "projector":
        return name.startswith(f"projectors.{task}.")
    if kind == "plugin":
        return f".plugins.{task}." in name
    return name in ("llm.model.embed_tokens.weight", "llm.lm_head.weight")


EXPECTED = {
    (1, "comp"): ["projector.comp"],
    (1, "gen"): ["projector.gen", "plugin.gen"],
    (1, "mixed"): ["projector.comp", "projector.gen", "plugin.gen"],
    (2, "mixed"): ["fusion"],
    (3, "comp"): ["projector.comp", "plugin.comp"],
    (3, "gen"): ["projector.gen", "plugin.gen"],
    (3, "mixed"): ["projector.comp", "projector.gen", "plugin.comp", "plugin.gen"],
}


@pytest.mark.parametrize("stage, task", list(EXPECTED))
def test_stage_trains_only_its_parts(env, tmp_path, stage, task):
    model = copy.deepcopy(env["model"])
    with torch.no_grad():  # a trained-looking start, so every plugin tensor gets a gradient
        for name, p in model.named_parameters():
            if ".plugins." in name and name.endswith(".B"):
                p.normal_(0, 0.02)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_stage(TrainArguments(stage=stage, task=task, data=env["data"], output=str(tmp_path / "out"), preset="tiny",
                               max_steps=1, global_batch_size=8, per_device_batch_size=8, scheduler="constant",
                               warmup_ratio=0.0, save_steps=1000, cache_dir=env["cache"]),
                model=model, save_final=False, quiet=True)
    after = model.state_dict()
    parts = EXPECTED[(stage, task)]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    outside = sorted(k for k in changed if not any(_is(k, p) for p in parts))
    assert not outside, f"stage {stage} {task} changed {outside[:5]}"
    for part in parts:  # and every part it should train did move
        moved = [k for k in changed if _is(k, part)]
        assert moved, f"stage {stage} {task}: {part} did not change"
        if part.startswith("plugin"):
            assert any(k.endswith(".A") for k in moved) and any(k.endswith(".router") for k in moved)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith(("vision.", "image_tokenizer.")))


def test_table7_hyperparameters():
    m3 = STAGE_HPARAMS["m3"]
    assert (m3[(1, "comp")].projector_lr, m3[(1, "comp")].lr, m3[(1, "comp")].global_batch_size, m3[(1, "comp")].dropout) == (1e-3, None, 256, 0.0)
    assert (m3[(1, "gen")].projector_lr, m3[(1, "gen")].lr, m3[(1, "gen")].global_batch_size) == (2e-5, 2e-4, 64)
    assert (m3[(2, "mixed")].lr, m3[(2, "mixed")].global_batch_size, m3[(2, "mixed")].scheduler) == (2e-4, 32, "constant")
    assert [m3[(3, t)].global_batch_size for t in ("comp", "gen")] == [128, 64]
    assert all(h.weight_decay == 0 and h.max_length == 2048 for h in m3.values())
    assert {h.scheduler for k, h in m3.items() if k[0] != 2} == {"cosine"}
    assert STAGE_HPARAMS["l14"][(1, "gen")].lr == 1e-4
    with pytest.raises(ValueError, match="stage 2 trains the shared fusion layer"):
        plan_stage(2, "comp", "m3")


class _Capture(TrainerCallback):
    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self.groups = {g["name"]: (g.get("initial_lr", g["lr"]), g["weight_decay"], len(g["params"])) for g in optimizer.param_groups}
        self.tensors = {g["name"]: [id(p) for p in g["params"]] for g in optimizer.param_groups}
        self.args = args


@pytest.mark.parametrize("stage, task, rates", [
    (1, "comp", {"projector.comp": 1e-3}),
    (3, "comp", {"projector.comp": 2e-5, "plugin.comp": 2e-4}),
    (2, "mixed", {"fusion": 2e-4}),
])
def test_separate_learning_rates_and_schedule(env, tmp_path, stage, task, rates):
    model = copy.deepcopy(env["model"])
    cap = _Capture()
    train_stage(TrainArguments(stage=stage, task=task, data=env["data"], output=str(tmp_path / "out"), preset="m3",
                               max_steps=1, global_batch_size=8, per_device_batch_size=8, save_steps=1000,
                               cache_dir=env["cache"]),
                model=model, save_final=False, quiet=True, callbacks=[cap])
    # the optimizer's groups carry the m3 rates (the scheduler scales them all alike)
    assert {name: lr for name, (lr, _, _) in cap.groups.items()} == rates
    assert all(wd == 0.0 for _, wd, _ in cap.groups.values())
    assert getattr(cap.args.lr_scheduler_type, "value", None) == ("constant" if stage == 2 else "cosine")
    assert cap.args.warmup_steps == (0.0 if stage == 2 else 0.03)
    plan = apply_stage(model, plan_stage(stage, task, "m3"))
    assert {g["name"]: g["lr"] for g in plan.groups} == rates
    # the groups are the model's own Parameters, and the optimizer holds exactly those objects
    assert {g["name"]: [id(p) for p in g["params"]] for g in plan.groups} == cap.tensors
    assert {i for ids in cap.tensors.values() for i in ids} == {id(p) for p in model.parameters() if p.requires_grad}
    assert plan.dropout == ({"comp": 0.0, "gen": 0.0} if stage == 1 else {"comp": 0.05, "gen": 0.05})
    layer = next(m for m in model.llm.modules() if hasattr(m, "plugins"))
    assert layer.plugins["comp"].dropout == plan.dropout["comp"]
    assert {t: c.dropout for t, c in hlora.get_config(model.llm).plugins.items()} == plan.dropout  # what hlora.save records


def test_output_guards(env, tmp_path):
    out = str(tmp_path / "out")
    kw = dict(data=env["data"], output=out, preset="tiny", max_steps=2, global_batch_size=8, per_device_batch_size=8,
              save_steps=1, cache_dir=env["cache"])

    def run(**args):
        return train_stage(TrainArguments(**{**kw, **args}), model=copy.deepcopy(env["model"]), save_final=False, quiet=True)

    with pytest.raises(TrainError, match="--resume: no complete checkpoint"):
        run(stage=1, task="comp", resume=True)
    run(stage=1, task="comp")
    with pytest.raises(TrainError, match="pass --resume to continue it or --overwrite"):
        run(stage=1, task="comp")
    with pytest.raises(TrainError, match=r"differs from the one .* in \['stage'"):
        run(stage=3, task="comp", resume=True)
    with pytest.raises(TrainError, match="needs --task"):
        run(stage=3)
    with pytest.raises(TrainError, match="not a multiple"):
        run(stage=1, task="comp", per_device_batch_size=3, overwrite=True)


def test_gradient_checkpointing_gives_the_same_step(env, tmp_path):
    kw = dict(stage=3, task="mixed", data=env["data"], preset="tiny", max_steps=1, global_batch_size=8,
              per_device_batch_size=8, dropout=0.0, scheduler="constant", warmup_ratio=0.0, save_steps=1000,
              cache_dir=env["cache"])
    plain, ckpt = copy.deepcopy(env["model"]), copy.deepcopy(env["model"])
    for m in (plain, ckpt):
        with torch.no_grad():
            for name, p in m.named_parameters():
                if ".plugins." in name and name.endswith(".B"):
                    p.copy_(torch.linspace(-0.02, 0.02, p.numel()).view_as(p))
    train_stage(TrainArguments(output=str(tmp_path / "a"), **kw), model=plain, save_final=False, quiet=True)
    train_stage(TrainArguments(output=str(tmp_path / "b"), gradient_checkpointing=True, **kw), model=ckpt,
                save_final=False, quiet=True)
    on = lambda m: getattr(m, "is_activation_checkpointing", getattr(m, "is_gradient_checkpointing", None))  # noqa: E731
    assert on(ckpt) is True and on(plain) is False
    a, b = plain.state_dict(), ckpt.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_train_cli(env, tmp_path, capsys):
    from healthgpt.cli.train import main

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "r0", "image": "missing.png", "task": "comp",
                                "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]))
    rc = main(["--stage", "1", "--task", "comp", "--data", str(bad), "--output", str(tmp_path / "x"), "--preset", "tiny"])
    assert rc == 2 and "row 0 (id 'r0'): image 'missing.png' not found" in capsys.readouterr().err
    rc = main(["--stage", "1", "--task", "comp", "--data", env["data"], "--output", str(tmp_path / "s1"), "--preset", "tiny",
               "--max-steps", "2", "--global-batch-size", "4", "--logging-steps", "1", "--no-progress",
               "--cache-dir", env["cache"]])
    assert rc == 0 and "stage 1 comp: 2 steps" in capsys.readouterr().out
    info = json.load(open(tmp_path / "s1" / "stage.json"))
    assert info["complete"] and info["rows_by_task"] == {"comp": 4, "gen": 0} and info["trained"][0]["name"] == "projector.comp"
    assert os.path.isfile(tmp_path / "s1" / "loss_curve.png") and os.path.isfile(tmp_path / "s1" / "training_args.json")
    # the next stage starts from this folder (its preset is inherited)
    rc = main(["--stage", "2", "--data", env["data"], "--output", str(tmp_path / "s2"), "--init", str(tmp_path / "s1"),
               "--max-steps", "1", "--global-batch-size", "4", "--no-progress", "--cache-dir", env["cache"]])
    assert rc == 0
    info = json.load(open(tmp_path / "s2" / "stage.json"))
    assert info["preset"] == "tiny" and info["init"] == str(tmp_path / "s1") and info["trained"][0]["name"] == "fusion"
    rc = main(["--stage", "1", "--task", "comp", "--data", env["data"], "--output", str(tmp_path / "ds"), "--preset", "tiny",
               "--deepspeed", "no-such-config.json"])
    assert rc == 2 and "no such config file" in capsys.readouterr().err


def test_train_arguments_from_the_command_line(capsys):
    from healthgpt.cli import build_parser
    from healthgpt.cli.train import main, train_arguments

    parser = build_parser({"train": "healthgpt.cli.train:register"})
    args = parser.parse_args(["train", "--stage", "3", "--task", "mixed", "--data", "train.json", "--output", "DIR",
                              "--init", "S2", "--preset", "m3", "--model-preset", "tiny", "--global-batch-size", "8",
                              "--lr", "3e-4", "--bf16", "--no-progress", "--resume"])
    assert train_arguments(args) == TrainArguments(stage=3, task="mixed", data="train.json", output="DIR", init="S2",
                                                   preset="m3", model_preset="tiny", global_batch_size=8, lr=3e-4,
                                                   bf16=True, progress=False, resume="auto")
    stage2 = train_arguments(parser.parse_args(["train", "--stage", "2", "--data", "d", "--output", "o", "--resume", "ck"]))
    assert (stage2.task, stage2.resume, stage2.progress, stage2.seed, stage2.save_steps) == ("mixed", "ck", True, 42, 500)
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "hyperparameters (STAGE_HPARAMS)" in help_text and "architecture (MODEL_PRESETS)" in help_text
    for bad in (["--stage", "4"], ["--stage", "1", "--preset", "xl"], ["--stage", "1", "--task", "both"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["train", "--data", "d", "--output", "o", *bad])
    # the Python API checks what argparse would
    with pytest.raises(TrainError, match="stage 1 needs --task"):
        TrainArguments(stage=1, data="d", output="o")
    with pytest.raises(TrainError, match="unknown --model-preset 'xl'"):
        TrainArguments(stage=1, task="comp", data="d", output="o", model_preset="xl")


def test_batch_geometry():
    from healthgpt.training.run import BatchGeometry, batch_geometry

    # global = per device x processes x accumulation; per device defaults to min(4, global / processes)
    assert batch_geometry(32, None, 2) == BatchGeometry(global_batch=32, per_device=4, processes=2, accumulation=4)
    assert batch_geometry(6, None, 3) == BatchGeometry(global_batch=6, per_device=2, processes=3, accumulation=1)
    assert batch_geometry(8, 8, 1) == BatchGeometry(global_batch=8, per_device=8, processes=1, accumulation=1)
    with pytest.raises(TrainError, match="global batch 3 is not a multiple of per-device batch 1 x 8 processes"):
        batch_geometry(3, None, 8)


def test_optimizer_groups_must_be_the_models_parameters(tiny_model, tmp_path):
    from transformers import TrainingArguments

    from healthgpt.training.trainer import HealthGPTTrainer

    model = tiny_model("phi3")
    head, rest = model.lm_head.weight, [p for n, p in model.named_parameters() if n != "lm_head.weight"]
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)

    def optimizer(groups):
        return HealthGPTTrainer(model=model, args=args, param_groups=groups).create_optimizer()

    opt = optimizer([{"name": "head", "lr": 1e-3, "params": [head]}, {"name": "rest", "lr": 2e-4, "params": rest}])
    assert [(g["name"], g["lr"], [id(p) for p in g["params"]]) for g in opt.param_groups] == [
        ("head", 1e-3, [id(head)]), ("rest", 2e-4, [id(p) for p in rest])]
    with pytest.raises(RuntimeError, match="trainable parameters in no group"):
        optimizer([{"name": "head", "lr": 1e-3, "params": [head]}])
    stranger = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(RuntimeError, match="'rest' holds 1 tensor\\(s\\) that are not parameters of the model"):
        optimizer([{"name": "head", "lr": 1e-3, "params": [head]}, {"name": "rest", "lr": 2e-4, "params": [*rest, stranger]}])
