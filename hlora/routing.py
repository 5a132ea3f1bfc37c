"""The hard router's decision for the next batches, built once per ``set_task`` and shared by every
adapter layer of the model."""

from __future__ import annotations

import torch

__all__ = ["Routing"]


class Routing:
    """``active``: the plugin indices (model-wide order) the batch uses. ``per_sample``: ``None`` when
    every sample takes ``active[0]``, else a CPU int64 tensor [batch] of indices into ``active``
    (-1 = base model only). ``batch``: the batch size the routing was given for (``None``: any).
    The per-token expansion is cached per (device, token shape), so a forward through many layers
    builds it once."""

    def __init__(self, active: tuple, per_sample: torch.Tensor | None = None, batch: int | None = None):
        self.active = tuple(active)
        self.per_sample = per_sample
        self.batch = per_sample.numel() if per_sample is not None else batch
        self._cache: dict = {}

    @classmethod
    def from_sample_ids(cls, ids: torch.Tensor) -> "Routing | None":
        """One plugin index per sample (-1 = none) -> the routing, or ``None`` if no sample has a plugin."""
        active = sorted(set(ids.tolist()) - {-1})
        if not active:
            return None
        if len(active) == 1 and bool((ids == active[0]).all()):
            return cls(active, batch=ids.numel())
        remap = torch.full((max(active) + 2,), -1, dtype=torch.int64)  # the last slot maps -1 to -1
        remap[torch.tensor(active)] = torch.arange(len(active))
        return cls(active, remap[ids])

    def token_plugin(self, x: torch.Tensor) -> torch.Tensor | None:
        """[T] index into ``active`` for each token of ``x`` [batch, ..., d] (batch first)."""
        batch = self.batch
        if batch is not None and (x.dim() < 2 or x.shape[0] != batch):
            raise ValueError(
                f"per-sample routing holds {batch} tasks but the layer got input of shape {tuple(x.shape)} "
                f"(batch dimension first expected); call hlora.set_task with one task per sample of this batch"
            )
        if self.per_sample is None:
            return None
        key = (x.device, x.shape[:-1])
        if key not in self._cache:
            per_token = self.per_sample.repeat_interleave(x.numel() // x.shape[-1] // batch)
            self._cache[key] = per_token.to(x.device, non_blocking=True)
        return self._cache[key]
