"""Constants shared by the model, the data pipeline, training and evaluation, defined once here.

- ``TASKS``: the two plugins/tasks of the hard router, in index order: ``comp`` (comprehension:
  text answers) and ``gen`` (generation: answers are 1024 VQ image tokens). An int tensor of
  task indices indexes this tuple.
- ``IMAGE_PLACEHOLDER``: the text marking where the image goes in a user turn (LLaVA's ``<image>``),
  in training files and prompts alike.
- ``IMAGE_TOKEN_INDEX``: the id the placeholder expands to (``num_image_tokens`` copies) before the
  model fills those positions with projected patch features; LLaVA's -200, never a vocabulary id.
- ``IGNORE_INDEX``: the label of positions the loss skips (PyTorch cross-entropy's default -100).
- ``FILE_DIGEST``: the ``hashlib`` algorithm naming a file by its bytes (VQ-id cache keys, the
  training data digest in run summaries); ``healthgpt.data.vq_cache.file_digest`` computes it.
"""

from __future__ import annotations

__all__ = ["TASKS", "IMAGE_PLACEHOLDER", "IMAGE_TOKEN_INDEX", "IGNORE_INDEX", "FILE_DIGEST"]

TASKS = ("comp", "gen")
IMAGE_PLACEHOLDER = "<image>"
IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
FILE_DIGEST = "sha256"
