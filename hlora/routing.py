"""The hard router's decision for the next batches, built once per ``set_task`` and shared by every
adapter layer of the model."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Routing", "TokenGroups", "renumber"]


def renumber(index: torch.Tensor, kept, size: int) -> torch.Tensor:
    """``index`` (values in [-1, size)) with the values in ``kept`` renumbered 0, 1, ... in that order and
    every other value, -1 included, mapped to -1."""
    remap = torch.full((size + 1,), -1, dtype=index.dtype, device=index.device)  # the last slot maps -1 to -1
    remap[torch.as_tensor(kept, dtype=torch.int64, device=index.device)] = torch.arange(
        len(kept), dtype=index.dtype, device=index.device)
    return remap[index]


class TokenGroups(NamedTuple):
    """A mixed batch's tokens grouped by plugin, for the kernels' grouped launches: ``order`` [T]
    (int32, on the activations' device) lists the token indices sorted by plugin (stable: tokens
    of one plugin keep their order), the unrouted (-1) tokens last; ``counts`` (host ints, one per
    plugin) says how many each plugin has, so plugin p's tokens are
    ``order[sum(counts[:p]) : sum(counts[:p + 1])]``; known without a device sync."""

    order: torch.Tensor
    counts: tuple

    @classmethod
    def from_token_plugin(cls, token_plugin: torch.Tensor, num_plugins: int, device=None) -> "TokenGroups":
        """From a per-token plugin index [T] (-1 = none). On a CUDA index this syncs once (the
        counts are host ints): ``Routing.token_groups`` builds them from the CPU routing instead."""
        tp = token_plugin.reshape(-1).to("cpu", torch.int64)
        if tp.numel() and (int(tp.min()) < -1 or int(tp.max()) >= num_plugins):
            raise ValueError(f"token plugin indices must lie in [-1, {num_plugins}), got {int(tp.min())}..{int(tp.max())}")
        key = torch.where(tp < 0, num_plugins, tp)  # unrouted tokens sort last
        order = torch.argsort(key, stable=True).to(torch.int32)
        counts = tuple(int(c) for c in torch.bincount(key, minlength=num_plugins + 1)[:num_plugins])
        target = token_plugin.device if device is None else device
        return cls(order.to(target, non_blocking=True), counts)


class Routing:
    """``active``: the plugin indices (model-wide order) the batch uses. ``per_sample``: ``None`` when
    every sample takes ``active[0]``, else a CPU int64 tensor [batch] of indices into ``active``
    (-1 = base model only). ``batch``: the batch size the routing was given for (``None``: any).
    The per-token expansion and its grouping by plugin (``token_groups``) are cached per (device,
    token shape), so a forward through many layers builds them once."""

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
        return cls(active, renumber(ids.to(torch.int64), active, max(active) + 1))

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
            self._cache[key] = self._per_token(x).to(x.device, non_blocking=True)
        return self._cache[key]

    def _per_token(self, x: torch.Tensor) -> torch.Tensor:
        return self.per_sample.repeat_interleave(x.numel() // x.shape[-1] // self.batch)

    def token_groups(self, x: torch.Tensor, keep: tuple | None = None) -> TokenGroups | None:
        """The tokens of ``x`` grouped by plugin (``TokenGroups``), built on the CPU from the
        per-sample routing (no device sync) and cached like ``token_plugin``; ``None`` for a
        one-plugin routing. ``keep``: the positions in ``active`` of the plugins a layer holds (in
        its order); tokens of the others count as unrouted."""
        if self.token_plugin(x) is None:  # also checks the batch dimension
            return None
        key = ("groups", x.device, x.shape[:-1], keep)
        if key not in self._cache:
            per_token = self._per_token(x)
            if keep is not None:
                per_token = renumber(per_token, keep, len(self.active))
            num = len(self.active) if keep is None else len(keep)
            self._cache[key] = TokenGroups.from_token_plugin(per_token, num, device=x.device)
        return self._cache[key]
