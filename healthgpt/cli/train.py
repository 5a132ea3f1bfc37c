"""``healthgpt train``: one stage of the three-stage recipe on transformers' Trainer.

    healthgpt train --stage 1 --task comp  --data align.json    --output out/s1-comp --preset m3 \\
        --llm-path Phi-3-mini-4k-instruct --vision-path clip-vit-large-patch14-336 --image-tokenizer-path vqgan
    healthgpt train --stage 1 --task gen   --data recon.json    --output out/s1-gen  --init out/s1-comp
    healthgpt train --stage 2 --task mixed --data mixed47k.json --output out/s2      --init out/s1-gen
    healthgpt train --stage 3 --task comp  --data vqa.json      --output out/s3-comp --init out/s2
    healthgpt train --stage 3 --task gen   --data conv.json     --output out/s3-gen  --init out/s3-comp

Two preset tables share the names m3 / l14 / tiny: ``--preset`` picks the training
hyperparameters (Table 7; ``healthgpt.training.presets.STAGE_HPARAMS``), ``--model-preset`` the
architecture of a model built here (``healthgpt.model.config.MODEL_PRESETS``; default: ``--preset``).
Each output directory is a complete model plus ``stage.json``, ``loss_log.jsonl``, ``loss_curve.png``
and the Trainer's ``checkpoint-N`` folders; it is the next stage's ``--init``. Stage 1 without
``--init`` builds the model (``tiny``: random weights, no files; ``m3``/``l14``: random unless
``--llm-path``/``--vision-path``/``--image-tokenizer-path`` point at local checkpoints).

Scale-out: ``torchrun --nproc_per_node 8 -m healthgpt.training ...`` (or ``accelerate launch``;
several nodes: healthgpt/training/configs/README.md), ``--fsdp`` (FSDP2, one unit per Phi-3 / CLIP
layer, on GPUs and on CPU processes; ``--fsdp-config``, default ``healthgpt/training/configs/fsdp.json``),
``--deepspeed healthgpt/training/configs/zero2.json`` or ``zero3.json`` (DeepSpeed ZeRO-2 / ZeRO-3, on
GPUs and CPU processes; ZeRO-3 builds the model partitioned, under ``zero.Init``), ``--bf16``,
``--gradient-checkpointing``. ``--global-batch-size`` is kept whatever the number of processes:
gradient accumulation = global / (per-device batch x processes).

``--resume`` continues the run in ``--output`` from its last complete checkpoint (same data order,
optimizer, scheduler and RNG state); ``--resume PATH`` from a given checkpoint. Every option is a
field of ``healthgpt.training.arguments.TrainArguments`` (the Python API: ``train_stage(TrainArguments(...))``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from transformers import HfArgumentParser

from healthgpt.cli import CLIError, subcommand
from healthgpt.training.arguments import TrainArguments, TrainError

__all__ = ["run_train", "train_arguments", "parse_train_arguments", "register", "main"]


def train_arguments(args: argparse.Namespace) -> TrainArguments:
    """The parsed ``healthgpt train`` options as the ``TrainArguments`` they were made from."""
    return TrainArguments(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainArguments)})


def parse_train_arguments(argv: list) -> TrainArguments:
    """``healthgpt train``'s command line (without the program name) -> its ``TrainArguments``; an
    unknown option or a bad value exits as argparse does."""
    return train_arguments(HfArgumentParser(TrainArguments).parse_args(list(argv)))


def run_train(args: argparse.Namespace) -> int:
    """``healthgpt train``: run one stage -> 0; a run that cannot start as asked is a ``CLIError`` (and a bad
    data row a ``DataError``): ``run_guarded`` prints it and exits with 2."""
    # The Trainer stack loads only when a run starts: building the healthgpt parser imports every registrar.
    from healthgpt.training.run import train_stage

    try:
        result = train_stage(train_arguments(args))
    except TrainError as e:
        raise CLIError(str(e)) from None
    if int(os.environ.get("RANK", "0")) == 0:
        first, last = result.first_loss, result.last_loss
        print(f"stage {result.stage} {result.task}: {result.steps} steps in {result.seconds:.1f}s, "
              f"loss {first:.3f} -> {last:.3f}; model in {result.output}" if first is not None else
              f"stage {result.stage} {result.task}: model in {result.output}")
    return 0


register, main = subcommand("train", "train one stage of the three-stage recipe", __doc__, None, run_train,
                            parents=(HfArgumentParser(TrainArguments, add_help=False),))


if __name__ == "__main__":
    sys.exit(main())
