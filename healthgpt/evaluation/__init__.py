"""Evaluation suite of HealthGPT: the paper's benchmarks, scorers and tables.

Entry point: ``healthgpt eval`` (``healthgpt.cli.eval``).

Modules:

- ``data``: benchmark registry and input formats (``load_samples``);
- ``normalise``: answer normalisation rules, yes/no reading, modality names;
- ``vqa``: closed accuracy, open token recall, ``close``/``open``/``all``;
- ``choice``: option letter -> option text -> similarity matching, per-modality accuracy;
- ``image_metrics``: grayscale 0..255 conversion, SSIM (Gaussian sigma 1.5), PSNR, MSE;
- ``lpips``: LPIPS v0.1 from local weight files;
- ``runner``: batched resumable inference over two callables (``answer_batch`` /
  ``generate_batch``); ``model_adapter`` builds them from a ``HealthGPT``;
- ``scoring``: rows -> summary + per-row scores (+ image panels);
- ``report``: markdown tables in the paper's layouts.
"""

from healthgpt.evaluation.choice import match_choice, score_choice, summarise_choice
from healthgpt.evaluation.data import BENCHMARKS, load_samples
from healthgpt.evaluation.image_metrics import mse, psnr, ssim, to_gray255
from healthgpt.evaluation.normalise import canonical_modality, normalise_answer, yes_no
from healthgpt.evaluation.vqa import open_recall, score_closed, summarise_vqa

__all__ = [
    "BENCHMARKS", "load_samples", "normalise_answer", "yes_no", "canonical_modality",
    "score_closed", "open_recall", "summarise_vqa", "match_choice", "score_choice",
    "summarise_choice", "to_gray255", "ssim", "psnr", "mse",
]
