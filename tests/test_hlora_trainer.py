"""transformers' Trainer on an injected tiny Llama (hlora.integrations.transformers): checkpoints hold
the plugins, not the frozen base; resuming continues the same run; save_model writes an hlora checkpoint."""

import inspect
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import hlora
from hlora.integrations.transformers import HLoRATrainer, HLoRATrainerMixin
from hlora.io import WEIGHTS_NAME

pytestmark = pytest.mark.usefixtures("one_thread")

PLUGINS = {"comp": hlora.PluginConfig(4, 2, 8, dropout=0.1), "gen": hlora.PluginConfig(4, 1, 4)}


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=12, seq=7, seed=1):
        self.ids = torch.randint(1, 97, (n, seq), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model(tiny_model, plugin_seed):
    """The same frozen base every time; the plugins' initial values depend on ``plugin_seed``."""
    model = tiny_model("llama")
    torch.manual_seed(plugin_seed)
    hlora.inject(model, hlora.HLoRAConfig(plugins=PLUGINS, target_modules=["q_proj", "v_proj", "down_proj"],
                                          modules_to_save=["lm_head"]))
    hlora.set_task(model, "comp")
    hlora.set_trainable(model, ["comp"])  # and lm_head
    return model.train()


def _args(out, **overrides):
    kw = dict(output_dir=str(out), per_device_train_batch_size=2, max_steps=6, save_steps=3, save_strategy="steps",
              logging_steps=1, learning_rate=2e-2, warmup_steps=2, weight_decay=0.01, seed=0, data_seed=0,
              report_to="none", use_cpu=True, disable_tqdm=True)
    return TrainingArguments(**{**kw, **overrides})


def _losses(trainer):
    return {row["step"]: row["loss"] for row in trainer.state.log_history if "loss" in row}


def _trainable(model):
    return {n: p.detach().clone() for n, p in hlora.trainable_parameters(model).items()}


def test_checkpoints_hold_the_plugins_and_resume_continues_the_same_run(tiny_model, tmp_path):
    straight = HLoRATrainer(model=_model(tiny_model, 1), args=_args(tmp_path / "a"), train_dataset=_Rows())
    straight.train()
    want_losses, want_weights = _losses(straight), _trainable(straight.model)
    assert sorted(want_losses) == [1, 2, 3, 4, 5, 6] and all(v == v for v in want_losses.values())

    # checkpoint-3: the plugins (hlora's format) + optimizer/scheduler/RNG/trainer state, no base weight
    ckpt = tmp_path / "a" / "checkpoint-3"
    files = set(os.listdir(ckpt))
    assert {WEIGHTS_NAME, "hlora_config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
            "training_args.bin"} <= files
    assert not {"model.safetensors", "pytorch_model.bin", "config.json"} & files
    saved = load_file(ckpt / WEIGHTS_NAME)
    assert set(saved) == set(hlora.plugin_state_dict(straight.model))  # both plugins and lm_head, nothing else
    assert not any("embed_tokens" in k or k.endswith("q_proj.weight") for k in saved)

    # a fresh model whose plugins start elsewhere resumes from checkpoint-3 and retraces steps 4..6
    resumed = HLoRATrainer(model=_model(tiny_model, 2), args=_args(tmp_path / "b"), train_dataset=_Rows())
    resumed.train(resume_from_checkpoint=str(ckpt))
    got_losses = _losses(resumed)
    assert [s for s in got_losses if s > 3] == [4, 5, 6]
    assert {s: got_losses[s] for s in (4, 5, 6)} == {s: want_losses[s] for s in (4, 5, 6)}
    got_weights = _trainable(resumed.model)
    assert got_weights.keys() == want_weights.keys()
    assert all(torch.equal(got_weights[n], want_weights[n]) for n in want_weights)

    # save_model writes an hlora checkpoint: loaded into the plain base it computes what the trained model does
    resumed.save_model(str(tmp_path / "final"))
    assert hlora.get_config(hlora.load(tiny_model("llama"), tmp_path / "final")) is not None
    fresh = hlora.load(tiny_model("llama"), tmp_path / "final")
    ids = _Rows(3, seed=5).ids
    model = resumed.model.eval()
    for task in ("comp", "gen"):
        hlora.set_task(model, task)
        hlora.set_task(fresh, task)
        with torch.no_grad():
            assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_resuming_into_a_model_with_other_plugins_is_refused(tiny_model, tmp_path):
    HLoRATrainer(model=_model(tiny_model, 1), args=_args(tmp_path / "a", max_steps=3), train_dataset=_Rows()).train()
    other = tiny_model("llama")
    hlora.inject(other, hlora.HLoRAConfig(plugins={"comp": PLUGINS["comp"]}, target_modules=["q_proj", "v_proj", "down_proj"],
                                          modules_to_save=["lm_head"]))
    trainer = HLoRATrainer(model=other.train(), args=_args(tmp_path / "b", max_steps=4), train_dataset=_Rows())
    with pytest.raises(ValueError, match=r"holds plugins \['comp', 'gen'\] but the model being trained has \['comp'\]"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))


def test_training_while_a_plugin_is_merged_is_refused_and_changes_nothing(tiny_model, tmp_path):
    model = _model(tiny_model, 1)
    hlora.merge(model, "gen")  # k = 1: mergeable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = HLoRATrainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=_Rows())
    with pytest.raises(RuntimeError, match=r"cannot train while plugin 'gen' is merged"):
        trainer.train()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not any(tmp_path.glob("checkpoint-*"))


def test_a_trainable_tensor_outside_the_plugins_is_not_silently_dropped(tiny_model, tmp_path):
    model = _model(tiny_model, 1)
    model.model.norm.weight.requires_grad_(True)
    trainer = HLoRATrainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=_Rows())
    with pytest.raises(RuntimeError, match=r"outside the hlora plugins would not be checkpointed: \['model.norm.weight'\]"):
        trainer.save_model(str(tmp_path / "out"))
    assert not (tmp_path / "out" / WEIGHTS_NAME).exists()


def test_load_best_model_at_end_loads_the_best_plugins(tiny_model, tmp_path):
    loaded = []

    class Spy(HLoRATrainer):
        def load_trainable_state(self, checkpoint_dir, model=None):
            loaded.append(checkpoint_dir)
            return super().load_trainable_state(checkpoint_dir, model)

    args = _args(tmp_path, max_steps=4, save_steps=1, eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
                 metric_for_best_model="loss", greater_is_better=False, learning_rate=0.5, warmup_steps=0)
    trainer = Spy(model=_model(tiny_model, 1), args=args, train_dataset=_Rows(), eval_dataset=_Rows(4, seed=9))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert loaded == [best]
    saved = load_file(os.path.join(best, WEIGHTS_NAME))
    now = hlora.plugin_state_dict(trainer.model)
    assert all(torch.equal(now[k], saved[k]) for k in saved)


def test_the_trainer_hooks_relied_on_are_still_there(tiny_model, tmp_path):
    # the private Trainer methods the mixin overrides, with the signatures it assumes
    overridden = sorted(n for n in vars(HLoRATrainerMixin) if n.startswith("_") and not n.startswith("__") and hasattr(Trainer, n))
    assert overridden == ["_load_best_model", "_load_from_checkpoint"]
    assert list(inspect.signature(Trainer._load_from_checkpoint).parameters) == ["self", "resume_from_checkpoint", "model"]
    assert list(inspect.signature(Trainer._load_best_model).parameters) == ["self"]
    assert list(inspect.signature(Trainer.save_model).parameters) == ["self", "output_dir", "_internal_call"]
    # the Trainer writes checkpoints through save_model and resumes through _load_from_checkpoint
    calls = []

    class Spy(HLoRATrainer):
        def save_model(self, output_dir=None, _internal_call=False):
            calls.append(("save", os.path.basename(output_dir)))
            return super().save_model(output_dir, _internal_call)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            calls.append(("load", os.path.basename(resume_from_checkpoint)))
            return super()._load_from_checkpoint(resume_from_checkpoint, model)

    first = Spy(model=_model(tiny_model, 1), args=_args(tmp_path, max_steps=2, save_steps=2), train_dataset=_Rows())
    first.train()
    Spy(model=first.model, args=_args(tmp_path, max_steps=3, save_steps=5), train_dataset=_Rows()).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert calls[:2] == [("save", "checkpoint-2"), ("load", "checkpoint-2")]
    assert all(kind == "save" for kind, _ in calls[2:])
