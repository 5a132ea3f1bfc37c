"""Every shipped distributed-training config loads in the library that reads it (a typo fails here),
and engine options that cannot run as asked stop with a clear error."""

import json
import os

import pytest
from transformers import TrainingArguments

from healthgpt.training import distributed, fsdp
from healthgpt.training.distributed import CONFIGS_DIR, EngineError, check_engine

SHIPPED = sorted(n for n in os.listdir(CONFIGS_DIR) if n.endswith((".json", ".yaml")))


def test_every_config_is_covered():
    assert SHIPPED == ["accelerate_fsdp.yaml", "fsdp.json", "zero2.json", "zero3.json"]


def test_fsdp_config_is_what_the_trainer_and_our_engine_use(tmp_path):
    path = os.path.join(CONFIGS_DIR, "fsdp.json")
    cfg = distributed.load_fsdp_config(path)
    assert tuple(cfg["transformer_layer_cls_to_wrap"]) == fsdp.SHARD_UNITS  # the same units on CPU and GPU
    args = TrainingArguments(output_dir=str(tmp_path), fsdp=True, fsdp_config=path, use_cpu=True, report_to="none")
    assert args.fsdp_plugin_args["fsdp_version"] == 2
    assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == ",".join(fsdp.SHARD_UNITS)
    assert args.fsdp_plugin_args["reshard_after_forward"] is True
    bad = tmp_path / "typo.json"
    bad.write_text(json.dumps({**cfg, "reshard_after_foward": True}))
    with pytest.raises(EngineError, match="reshard_after_foward"):
        distributed.load_fsdp_config(str(bad))


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


def test_accelerate_config_loads_and_names_only_known_launch_options():
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    path = os.path.join(CONFIGS_DIR, "accelerate_fsdp.yaml")
    cfg = ClusterConfig.from_yaml_file(path)  # unknown top-level keys raise
    assert cfg.num_machines == 2 and cfg.num_processes == 16 and cfg.distributed_type == "FSDP"
    options = {o for action in launch_command_parser()._actions for o in action.option_strings}
    assert all(f"--{key}" in options for key in cfg.fsdp_config), sorted(cfg.fsdp_config)
    assert str(cfg.fsdp_config["fsdp_version"]) == "2"
    assert cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == ",".join(fsdp.SHARD_UNITS)


def test_engine_combinations_that_cannot_run_stop():
    zero2 = os.path.join(CONFIGS_DIR, "zero2.json")
    with pytest.raises(EngineError, match="pass one"):
        check_engine(fsdp=True, deepspeed=zero2, use_cpu=False)
    with pytest.raises(EngineError, match="CPU processes") as e:
        check_engine(fsdp=False, deepspeed=zero2, use_cpu=True)
    assert "gloo" in str(e.value)
    with pytest.raises(EngineError, match="unsharded"):
        check_engine(fsdp=True, deepspeed=None, use_cpu=True)
    with pytest.raises(EngineError, match="no such file"):
        check_engine(fsdp=False, deepspeed="/nonexistent/zero9.json", use_cpu=False)
    check_engine(fsdp=True, deepspeed=None, use_cpu=False)  # GPUs: the Trainer's FSDP2
    check_engine(fsdp=False, deepspeed=zero2, use_cpu=False)  # GPUs: the Trainer's DeepSpeed
    check_engine(fsdp=False, deepspeed=None, use_cpu=True)  # CPUs: DDP


@pytest.mark.parametrize("flags, message", [(["--fsdp"], "unsharded"),
                                            (["--deepspeed", os.path.join(CONFIGS_DIR, "zero3.json")], "CPU processes")])
def test_healthgpt_train_refuses_what_would_run_as_something_else(flags, message, tmp_path, capsys):
    from healthgpt.cli.train import main

    data = tmp_path / "train.json"
    data.write_text("[]")
    out = tmp_path / "out"
    rc = main(["--stage", "3", "--task", "mixed", "--data", str(data), "--output", str(out), "--preset", "tiny", "--cpu", *flags])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (out / "run_config.json").exists()  # it stopped before building or training anything
