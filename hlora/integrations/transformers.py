"""transformers' ``Trainer`` on an hlora model: checkpoints hold the plugins, not the frozen base.

    from hlora.integrations.transformers import HLoRATrainer   # or HLoRATrainerMixin + your Trainer
    trainer = HLoRATrainer(model=model, args=args, train_dataset=data)
    trainer.train()                                   # checkpoint-N/: hlora_model.safetensors + config,
    trainer.train(resume_from_checkpoint=True)        #   optimizer, scheduler, RNG and trainer state
    trainer.save_model("out")                         # an hlora checkpoint: hlora.load(model, "out")

What is saved and restored is a trainer hook pair (``save_trainable_state`` /
``load_trainable_state``), hlora's format by default; a trainer with other trainable state (HealthGPT's
projector and fusion layer) overrides the pair and keeps the rest of the mechanism. With DeepSpeed or
FSDP the engines' own checkpoints are used unchanged.

Hooks used: ``Trainer.save_model`` (public; ``_save_checkpoint`` writes the model part of
``checkpoint-N`` through it), ``Trainer._load_from_checkpoint`` and ``Trainer._load_best_model``
(private: transformers has no public hook to restore weights on resume or at the end of training;
``tests/test_hlora_trainer.py`` fails if transformers stops calling them as assumed).
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from ..config import HLoRAConfig
from ..io import WEIGHTS_NAME, load, plugin_state_dict, save
from ..model import get_config, require_unmerged

__all__ = ["HLoRATrainerMixin", "HLoRATrainer"]


class HLoRATrainerMixin:
    """Put before ``Trainer`` (or a subclass such as TRL's) in the bases:
    ``class MyTrainer(HLoRATrainerMixin, Trainer)``.

    - ``save_model`` (so every ``checkpoint-N`` and ``trainer.save_model()``) writes
      ``save_trainable_state`` (hlora's ``hlora_model.safetensors`` + ``hlora_config.json``: every
      plugin and the config's ``modules_to_save``), the processing class and ``training_args.bin``;
      no base weight. The Trainer adds optimizer, scheduler, scaler, RNG and trainer state to a
      checkpoint as usual.
    - ``resume_from_checkpoint`` restores them through ``load_trainable_state`` (the same config
      required; checked before anything is copied) and continues the run;
      ``load_best_model_at_end`` loads the best checkpoint's the same way.
    """

    def train(self, *args, **kwargs):
        """``Trainer.train``, refused while a plugin is merged: the optimizer would update plugin weights
        the merged base already holds, and a later ``hlora.unmerge`` would corrupt the base."""
        require_unmerged(self.model, "train")  # any module tree: HealthGPT keeps its plugins in model.llm
        return super().train(*args, **kwargs)

    def _engine_checkpoints(self) -> bool:
        return bool(self.is_deepspeed_enabled or self.is_fsdp_enabled)

    # ---- the hook pair: what a checkpoint holds -----------------------------------------------------

    def _hlora_model(self, model=None):
        model = self.model if model is None else model
        if get_config(model) is None:
            model = self.accelerator.unwrap_model(model)
        if get_config(model) is None:
            raise RuntimeError(f"{type(model).__name__} has no hlora plugins: call hlora.inject(model, config) before "
                               f"building the trainer, or use transformers' Trainer")
        return model

    def save_trainable_state(self, output_dir: str) -> None:
        """Write every trainable tensor to ``output_dir``: here ``hlora.save``. A trainable parameter
        outside the plugins and ``modules_to_save`` would be lost on resume: an error names it."""
        model = self._hlora_model()
        saved = set(plugin_state_dict(model))
        stray = [n for n, p in model.named_parameters() if p.requires_grad and n not in saved]
        if stray:
            raise RuntimeError(f"trainable parameters outside the hlora plugins would not be checkpointed: {stray[:5]}; "
                               f"list their modules in HLoRAConfig.modules_to_save, or freeze them")
        save(model, output_dir)

    def holds_trainable_state(self, checkpoint_dir: str) -> bool:
        return os.path.isfile(os.path.join(checkpoint_dir, WEIGHTS_NAME))

    def load_trainable_state(self, checkpoint_dir: str, model=None) -> None:
        """Restore what ``save_trainable_state`` wrote into the run's model (same plugins and config)."""
        model = self._hlora_model(model)
        have, saved = get_config(model), HLoRAConfig.load(checkpoint_dir)
        if saved.plugin_names != have.plugin_names:
            raise ValueError(f"{checkpoint_dir} holds plugins {saved.plugin_names} but the model being trained has "
                             f"{have.plugin_names}: resume with the model the run started from")
        load(model, checkpoint_dir)

    # ---- the Trainer methods that call the pair ----------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The trainable state, the processing class and ``training_args.bin``; DeepSpeed/FSDP: the
        engine's save."""
        if self._engine_checkpoints():
            return super().save_model(output_dir, _internal_call)
        output_dir = self.args.output_dir if output_dir is None else output_dir
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            self.save_trainable_state(output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        if self._engine_checkpoints() or not self.holds_trainable_state(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.load_trainable_state(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if self._engine_checkpoints() or not self.holds_trainable_state(best):
            return super()._load_best_model()
        self.load_trainable_state(best)


class HLoRATrainer(HLoRATrainerMixin, Trainer):
    """``transformers.Trainer`` with hlora checkpoints (``HLoRATrainerMixin``)."""
