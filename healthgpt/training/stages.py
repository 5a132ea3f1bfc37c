"""What each stage trains (reference.md section 4), as parameter groups with their learning rates.

    stage 1 comp   comprehension projector                       (projector lr)
    stage 1 gen    generation projector + generation plugin      (projector lr, lr)
    stage 2        embed_tokens + lm_head, the "fusion layer"    (lr); plugins and projectors frozen
    stage 3 comp   comprehension plugin + projector              (projector lr, lr)
    stage 3 gen    generation plugin + projector                 (projector lr, lr)

``mixed`` in stages 1 and 3 is the union of both tasks' rows, each task's groups at its own rates.
The vision tower, the image tokenizer and every base weight of the LLM stay frozen throughout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import hlora

from healthgpt.training.presets import get_hparams

__all__ = ["StagePlan", "plan_stage", "apply_stage", "TRAINS"]

TRAINS = {
    (1, "comp"): dict(projectors=("comp",), plugins=(), fusion=False),
    (1, "gen"): dict(projectors=("gen",), plugins=("gen",), fusion=False),
    (2, "mixed"): dict(projectors=(), plugins=(), fusion=True),
    (3, "comp"): dict(projectors=("comp",), plugins=("comp",), fusion=False),
    (3, "gen"): dict(projectors=("gen",), plugins=("gen",), fusion=False),
}


@dataclass
class StagePlan:
    """The run's trainable parts, per-group learning rates, plugin dropout and schedule."""

    stage: int
    task: str
    hparams: dict  # table column ("comp"/"gen"/"mixed") -> StageHParams
    projectors: tuple = ()
    plugins: tuple = ()
    fusion: bool = False
    groups: list = field(default_factory=list)  # [{"name", "lr", "params": [Parameter]}] after apply_stage
    dropout: dict = field(default_factory=dict)  # plugin -> dropout

    @property
    def main(self):
        """The hyperparameters that are per run (batch, schedule, epochs, max length)."""
        hp = list(self.hparams.values())
        if len(hp) == 1:
            return hp[0]
        return min(hp, key=lambda h: h.global_batch_size)

    def describe(self) -> str:
        parts = [f"{g['name']} ({sum(1 for _ in g['params'])} tensors, lr {g['lr']:g})" for g in self.groups]
        return f"stage {self.stage} {self.task}: trains " + "; ".join(parts)


def plan_stage(stage: int, task: str, preset: str, **overrides) -> StagePlan:
    """The plan for ``stage``/``task`` with ``preset``'s hyperparameters (``overrides`` applied:
    ``projector_lr``, ``lr``, ``global_batch_size``, ``dropout``, ``scheduler``...)."""
    hparams = get_hparams(preset, stage, task, **overrides)
    projectors, plugins, fusion = [], [], False
    for t in hparams:
        spec = TRAINS[(stage, t)]
        projectors += [p for p in spec["projectors"] if p not in projectors]
        plugins += [p for p in spec["plugins"] if p not in plugins]
        fusion = fusion or spec["fusion"]
    return StagePlan(stage=stage, task=task, hparams=hparams, projectors=tuple(projectors), plugins=tuple(plugins), fusion=fusion)


def _rate(plan: StagePlan, task: str | None, kind: str) -> float:
    hp = plan.hparams.get(task) if task in plan.hparams else plan.hparams.get("mixed", plan.main)
    value = hp.projector_lr if kind == "projector" else hp.lr
    if value is None:
        raise ValueError(f"stage {plan.stage} {task or plan.task}: the preset gives no {kind} learning rate; pass one explicitly")
    return float(value)


def apply_stage(model, plan: StagePlan) -> StagePlan:
    """Freeze ``model`` (a ``HealthGPT``) except what ``plan`` trains, set every plugin's dropout
    for the stage, and fill ``plan.groups`` with the Parameters of each learning rate."""
    model.set_trainable(plugins=plan.plugins, projectors=plan.projectors, fusion=plan.fusion)
    groups = []
    for t in plan.projectors:
        groups.append({"name": f"projector.{t}", "lr": _rate(plan, t, "projector"),
                       "params": list(model.projectors[t].parameters())})
    for t in plan.plugins:
        params = [p for n, p in model.named_parameters() if p.requires_grad and f".plugins.{t}." in n]
        groups.append({"name": f"plugin.{t}", "lr": _rate(plan, t, "plugin"), "params": params})
    if plan.fusion:
        emb, head = model.llm.get_input_embeddings().weight, model.llm.get_output_embeddings().weight
        params = [emb] if head is emb else [emb, head]  # tied embeddings: one tensor
        groups.append({"name": "fusion", "lr": _rate(plan, "mixed", "fusion"), "params": params})
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = {names.get(id(p), "<not a model parameter>") for g in groups for p in g["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if grouped != trainable:  # a model change the plan does not know: refuse rather than train silently
        raise RuntimeError(f"trainable parameters outside the stage's groups: {sorted(trainable - grouped)[:5]}; "
                           f"grouped but frozen: {sorted(grouped - trainable)[:5]}")
    plan.groups = groups
    dropout = {}
    for t in ("comp", "gen"):
        hp = plan.hparams.get(t) or plan.hparams.get("mixed") or plan.main
        dropout[t] = float(hp.dropout)
    hlora.set_dropout(model.llm, dropout)  # the layers and the config hlora.save records
    plan.dropout = dropout
    return plan
