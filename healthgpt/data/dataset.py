"""Training samples as model inputs, and the collator that batches them.

``TrainingDataset`` turns validated rows (``healthgpt.data.format``) into
``{"input_ids", "labels", "images", "task"}`` with the model's own ``prepare_sample`` (its chat
template, tokenizer and image preprocessing, so training and inference build prompts the same
way). Generation targets are given as VQ ids from the on-disk cache (``VQCache``), so no epoch
runs the image tokenizer.

Length (``max_length``): a sample whose prompt (system, question, image positions) alone reaches
``max_length`` is an error naming the row and both lengths (nothing of the answer would be
trained); a comprehension sample whose answer runs past it is cut to ``max_length`` with a
warning naming the row (once per row); a generation sample's answer (the target's VQ ids) is
never cut, an error instead.

``Collator`` right-pads a list of those into a batch: ``input_ids`` (pad id), ``labels`` (-100),
``attention_mask``, ``images`` (the samples' CLIP pixel tensors concatenated in batch order, or
``None``) and ``tasks`` (one name per sample). ``HealthGPT.forward`` routes every sample to its
own projector, visual layer and H-LoRA plugin, so a batch may mix ``comp`` and ``gen`` rows.
"""

from __future__ import annotations

import warnings

import torch

from healthgpt.constants import IGNORE_INDEX
from healthgpt.data.format import DataError, load_samples
from healthgpt.data.vq_cache import VQCache

__all__ = ["TrainingDataset", "Collator", "build_dataset"]


class TrainingDataset(torch.utils.data.Dataset):
    """Rows -> model inputs (module docstring). ``prepare`` is ``HealthGPT.prepare_sample``."""

    def __init__(self, samples: list, prepare, codes: dict | None = None, max_length: int | None = None):
        self.samples = list(samples)
        self.prepare = prepare
        self.codes = codes or {}
        self.max_length = max_length
        self._warned = set()  # rows whose truncation was reported
        missing = [s.source for s in self.samples if s.task == "gen" and s.target_image not in self.codes]
        if missing:
            raise ValueError(f"no VQ ids for the targets of {len(missing)} generation rows (first: {missing[0]})")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def tasks(self) -> list:
        return [s.task for s in self.samples]

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        target = self.codes[s.target_image] if s.task == "gen" else None
        try:
            item = self.prepare(s.conversations, s.task, image=s.image, target=target)
        except DataError:
            raise
        except Exception as e:  # a bad image file...
            raise DataError(f"{s.source} (id {s.id!r}): {type(e).__name__}: {e}") from e
        return self._fit(item, s, i)

    def _fit(self, item: dict, s, i: int) -> dict:
        """The length policy of the module docstring."""
        ids, labels, limit = item["input_ids"], item["labels"], self.max_length
        if limit is None or len(ids) <= limit:
            return item
        supervised = (labels != IGNORE_INDEX).nonzero()
        prompt = int(supervised[0, 0]) if len(supervised) else len(ids)
        where = f"{s.source} (id {s.id!r})"
        if prompt >= limit:
            raise DataError(f"{where}: the question is too long: its prompt (with the image positions) is {prompt} "
                            f"tokens, max_length is {limit}, so no answer token would be trained; shorten the "
                            f"question or raise --max-length")
        if s.task == "gen":
            raise DataError(f"{where}: the sample is {len(ids)} tokens, max_length is {limit}; a generation answer "
                            f"(the target's VQ ids) cannot be cut; raise --max-length")
        if i not in self._warned:
            self._warned.add(i)
            warnings.warn(f"{where}: {len(ids)} tokens cut to max_length={limit}: the last "
                          f"{len(ids) - limit} answer tokens are not trained", stacklevel=2)
        return {**item, "input_ids": ids[:limit], "labels": labels[:limit]}


class Collator:
    """Right-pads samples into a batch (module docstring); holds no model, so it pickles cheaply."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None | str = "auto"):
        """``pad_to_multiple_of``: round each batch's length up to a multiple of this; ``"auto"`` is 64
        when CUDA is available (the fused kernels then see a handful of token counts and tune once
        per shape bucket, not per step) and no rounding otherwise; ``None`` never rounds."""
        if pad_to_multiple_of == "auto":
            pad_to_multiple_of = 64 if torch.cuda.is_available() else None
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of must be a positive int, None or 'auto', got {pad_to_multiple_of!r}")
        self.pad_id = int(pad_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list) -> dict:
        if not features:
            raise ValueError("cannot collate an empty list of samples")
        T = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        B = len(features)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        for b, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[b, :n] = torch.as_tensor(f["input_ids"])
            labels[b, :n] = torch.as_tensor(f["labels"])
            attention_mask[b, :n] = 1
        pixels = [f["images"] for f in features if f.get("images") is not None]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "images": torch.cat(pixels) if pixels else None,
            "tasks": [f["task"] for f in features],
        }


def build_dataset(
    model,
    path: str,
    *,
    task: str | None = None,
    skip_bad: bool = False,
    image_folder: str | None = None,
    cache_dir: str | None = None,
    max_length: int | None = None,
    progress: bool = False,
    log=print,
    device=None,
) -> tuple:
    """Load, validate and VQ-encode a training file for ``model`` -> ``(TrainingDataset, LoadReport, VQCache|None)``.

    ``task``: ``comp``/``gen`` keep that task's rows, ``mixed``/None all. ``cache_dir``: the VQ-id
    cache root (default: ``healthgpt.data.samples.default_cache_dir()``). ``device``: where the image
    tokenizer encodes the targets not cached yet (e.g. ``cuda:0``); it returns to its device after.
    """
    samples, report = load_samples(path, image_folder=image_folder, skip_bad=skip_bad, task=task)
    if log is not None:
        log(report.summary())
        for msg in report.examples:
            log("  skipped: " + msg)
    targets = [s.target_image for s in samples if s.task == "gen"]
    cache, codes = None, {}
    if targets:
        if cache_dir is None:
            from healthgpt.data.samples import default_cache_dir

            cache_dir = default_cache_dir()
        tokenizer = model.image_tokenizer
        cache = VQCache(cache_dir, tokenizer)
        home = next(tokenizer.parameters()).device
        if device is not None and str(device) != str(home):
            tokenizer.to(device)
        try:
            codes = cache.encode_all(targets, progress=progress)
        finally:
            tokenizer.to(home)
        if log is not None:
            log(f"VQ ids: {cache.hits} cached, {cache.misses} encoded ({cache.dir})")
    return TrainingDataset(samples, model.prepare_sample, codes, max_length=max_length), report, cache
