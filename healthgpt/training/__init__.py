"""HealthGPT's three-stage training (reference.md section 4) on transformers' Trainer.

``healthgpt train`` = ``healthgpt.training.run.run_train``; the Python API is ``train_stage``.
"""

from healthgpt.training.presets import PRESETS, StageHParams, get_hparams
from healthgpt.training.stages import StagePlan, apply_stage, plan_stage

__all__ = ["PRESETS", "StageHParams", "get_hparams", "StagePlan", "plan_stage", "apply_stage", "train_stage",
           "add_train_arguments", "run_train"]


def __getattr__(name):  # the Trainer stack is imported only when a run needs it
    if name in ("train_stage", "add_train_arguments", "run_train", "StageResult", "TrainError"):
        from healthgpt.training import run

        return getattr(run, name)
    raise AttributeError(name)
