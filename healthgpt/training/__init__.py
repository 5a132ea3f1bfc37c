"""HealthGPT's three-stage training (reference.md section 4) on transformers' Trainer.

``healthgpt train`` (``healthgpt.cli.train``) parses ``TrainArguments``; the Python API is
``train_stage(TrainArguments(...))``. ``STAGE_HPARAMS`` is the training hyperparameter preset table
(``--preset``); the model architectures are ``healthgpt.model.config.MODEL_PRESETS``.
"""

from healthgpt.training.arguments import TrainArguments, TrainError
from healthgpt.training.presets import STAGE_HPARAMS, StageHParams, get_hparams
from healthgpt.training.stages import StagePlan, apply_stage, plan_stage

__all__ = ["STAGE_HPARAMS", "StageHParams", "get_hparams", "StagePlan", "plan_stage", "apply_stage", "TrainArguments",
           "TrainError", "train_stage", "StageResult"]


def __getattr__(name):  # the Trainer stack is imported only when a run needs it
    if name in ("train_stage", "StageResult"):
        from healthgpt.training import run

        return getattr(run, name)
    raise AttributeError(name)
