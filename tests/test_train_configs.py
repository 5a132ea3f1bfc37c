"""Every shipped distributed-training config loads in the library that reads it (a typo fails here),
and engine options that cannot run as asked stop with a clear error."""

import argparse
import json
import os
import re

import pytest
from transformers import TrainingArguments

from healthgpt.training import distributed, fsdp
from healthgpt.training.distributed import CONFIGS_DIR, EngineError, check_engine

SHIPPED = sorted(n for n in os.listdir(CONFIGS_DIR) if n.endswith((".json", ".yaml")))


def test_every_config_is_covered():
    assert SHIPPED == ["accelerate_multinode.yaml", "fsdp.json", "zero2.json", "zero3.json"]


def test_fsdp_config_is_what_the_engine_uses(tmp_path):
    path = os.path.join(CONFIGS_DIR, "fsdp.json")
    cfg = distributed.load_fsdp_config(path)
    options = distributed.fsdp_engine_options(cfg)
    assert options == {"units": fsdp.SHARD_UNITS, "reshard_after_forward": True}  # one unit per Phi-3 / CLIP layer
    # the same file still reads as a transformers fsdp_config (the keys are the Trainer's names)
    args = TrainingArguments(output_dir=str(tmp_path), fsdp=True, fsdp_config=path, use_cpu=True, report_to="none")
    assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == ",".join(fsdp.SHARD_UNITS)
    assert distributed.fsdp_engine_options({**cfg, "reshard_after_forward": False})["reshard_after_forward"] is False
    bad = tmp_path / "typo.json"
    bad.write_text(json.dumps({**cfg, "reshard_after_foward": True}))
    with pytest.raises(EngineError, match="reshard_after_foward"):
        distributed.load_fsdp_config(str(bad))
    # what the engine does not implement is refused, not ignored
    for key, value in [("cpu_offload", True), ("activation_checkpointing", True), ("state_dict_type", "FULL_STATE_DICT"),
                       ("auto_wrap_policy", "SIZE_BASED_WRAP"), ("min_num_params", 10**6), ("cpu_ram_efficient_loading", True)]:
        with pytest.raises(EngineError, match=key):
            distributed.fsdp_engine_options({**cfg, key: value})


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs(stage, tmp_path):
    path = os.path.join(CONFIGS_DIR, f"zero{stage}.json")
    cfg = distributed.load_deepspeed_config(path)
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["train_batch_size"] == cfg["train_micro_batch_size_per_gpu"] == cfg["gradient_accumulation_steps"] == "auto"
    for broken, match in [({**cfg, "zero_optimisation": {}}, "zero_optimisation"),
                          ({**cfg, "train_batch_size": 64}, "auto"),
                          ({**cfg, "zero_optimization": {**cfg["zero_optimization"], "stage": 1}}, "stage")]:
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(broken))
        with pytest.raises(EngineError, match=match):
            distributed.load_deepspeed_config(str(bad))
    if stage == 3:
        bad = tmp_path / "nogather.json"
        zero = {k: v for k, v in cfg["zero_optimization"].items() if k != "stage3_gather_16bit_weights_on_model_save"}
        bad.write_text(json.dumps({**cfg, "zero_optimization": zero}))
        with pytest.raises(EngineError, match="gather"):
            distributed.load_deepspeed_config(str(bad))


def test_accelerate_config_loads_and_leaves_sharding_to_healthgpt_train():
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    path = os.path.join(CONFIGS_DIR, "accelerate_multinode.yaml")
    cfg = ClusterConfig.from_yaml_file(path)  # unknown top-level keys raise
    assert cfg.num_machines == 2 and cfg.num_processes == 16 and cfg.machine_rank == 0
    # accelerate only starts the processes: --fsdp / --deepspeed shard, --bf16 sets the precision
    assert cfg.distributed_type == "MULTI_GPU" and cfg.mixed_precision == "no" and not cfg.fsdp_config
    options = {o for action in launch_command_parser()._actions for o in action.option_strings}
    assert {"--machine_rank", "--main_process_ip", "--config_file"} <= options  # the recipe's flags


def test_readme_recipes_name_shipped_configs_and_real_options():
    """The launch lines of configs/README.md: every config they name is shipped, every healthgpt
    train option they pass exists, and every torchrun option is torchrun's."""
    from torch.distributed.run import get_args_parser

    from healthgpt.cli.train import register

    text = open(os.path.join(CONFIGS_DIR, "README.md")).read()
    named = set(re.findall(r"configs/([\w.]+\.(?:json|yaml))", text))
    assert named and named <= set(SHIPPED), named - set(SHIPPED)
    train_options = {o for a in register(argparse.ArgumentParser().add_subparsers())._actions for o in a.option_strings}
    torchrun_options = {o for a in get_args_parser()._actions for o in a.option_strings}
    commands = re.findall(r"^    (torchrun|accelerate launch) (.*?)(?=\n\n|\Z)", text, flags=re.S | re.M)
    assert {c for c, _ in commands} == {"torchrun", "accelerate launch"} and len(commands) >= 3
    for launcher, line in commands:
        launch, _, train = line.replace("\\\n", " ").partition("-m healthgpt.training")
        assert train, line
        flags = [w.split("=")[0] for w in train.split() if w.startswith("--")]
        assert set(flags) <= train_options, set(flags) - train_options
        if launcher == "torchrun":
            launch_flags = [w.split("=")[0] for w in launch.split() if w.startswith("--")]
            assert set(launch_flags) <= torchrun_options, set(launch_flags) - torchrun_options


def test_engine_combinations_that_cannot_run_stop():
    zero2 = os.path.join(CONFIGS_DIR, "zero2.json")
    with pytest.raises(EngineError, match="pass one"):
        check_engine(fsdp=True, deepspeed=zero2)
    with pytest.raises(EngineError, match="--bf16"):
        check_engine(fsdp=True, deepspeed=None, fp16=True)
    for engine in ("FSDP", "DEEPSPEED"):  # accelerate launch with a sharding config: accelerate would shard (or not)
        with pytest.raises(EngineError, match="accelerate_multinode.yaml"):
            check_engine(fsdp=False, deepspeed=None, environ={f"ACCELERATE_USE_{engine}": "true"})
    check_engine(fsdp=True, deepspeed=None, environ={"ACCELERATE_USE_FSDP": "false"})  # CPUs: the engine
    with pytest.raises(EngineError, match="no such file"):
        check_engine(fsdp=False, deepspeed="/nonexistent/zero9.json")
    zero3 = os.path.join(CONFIGS_DIR, "zero3.json")
    with pytest.raises(EngineError, match="4-bit weights cannot be"):  # ZeRO-3 partitions every parameter
        check_engine(fsdp=False, deepspeed=zero3, load_in_4bit=True)
    # ZeRO-2 and ZeRO-3 run on GPUs and CPU processes, mixed batches too (tests/test_train_deepspeed.py)
    check_engine(fsdp=False, deepspeed=zero2)
    check_engine(fsdp=False, deepspeed=zero3)
    check_engine(fsdp=False, deepspeed=zero2, load_in_4bit=True)
    check_engine(fsdp=True, deepspeed=None)


@pytest.mark.parametrize("flags, message", [(["--fsdp"], "torchrun"),  # one process: nothing to shard over
                                            (["--fsdp", "--fp16"], "--bf16"),
                                            (["--fsdp", "--load-in-4bit"], "4-bit"),
                                            (["--fsdp", "--fsdp-config", os.path.join(CONFIGS_DIR, "zero2.json")],
                                             "unknown keys"),
                                            (["--deepspeed", os.path.join(CONFIGS_DIR, "zero3.json"), "--load-in-4bit"],
                                             "ZeRO-3 and --load-in-4bit")])
def test_healthgpt_train_refuses_what_would_run_as_something_else(flags, message, tmp_path, capsys):
    from healthgpt.cli.train import main

    data = tmp_path / "train.json"
    data.write_text("[]")
    out = tmp_path / "out"
    rc = main(["--stage", "3", "--task", "mixed", "--data", str(data), "--output", str(out), "--preset", "tiny", "--cpu", *flags])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (out / "run_config.json").exists()  # it stopped before building or training anything


def test_resuming_needs_the_engine_that_wrote_the_checkpoints(tmp_path):
    """An --fsdp run's checkpoints are sharded: only an --fsdp run resumes them, and the other way round."""
    from healthgpt.training.arguments import TrainError
    from healthgpt.training.run import RUN_FILE, check_same_run

    run = {"stage": 3, "task": "mixed", "seed": 0}
    (tmp_path / RUN_FILE).write_text(json.dumps({**run, "fsdp": True}))
    with pytest.raises(TrainError, match=r"\['fsdp'\]"):
        check_same_run(str(tmp_path), run)
    check_same_run(str(tmp_path), {**run, "fsdp": True})
    (tmp_path / RUN_FILE).write_text(json.dumps(run))
    with pytest.raises(TrainError, match=r"\['fsdp'\]"):
        check_same_run(str(tmp_path), {**run, "fsdp": True})
    check_same_run(str(tmp_path), run)
