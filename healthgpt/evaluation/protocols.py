"""Scoring protocols of ``healthgpt eval --protocol``: their names, summary-key suffixes and rules.

- ``strict`` (default): the project's rules (``normalise.py``, ``vqa.py``, ``choice.py``):
  closed yes/no by the polarity of the first yes/no *word*, open recall with counts clipped to
  the answer's, multiple choice by letter then option text, never by guessing.
- ``llava-med``: the published scorers most medical-VQA tables are computed with: LLaVA-Med's
  ``run_eval.py`` for VQA-RAD / SLAKE / PathVQA (``llava_med.py``) and HuatuoGPT-Vision's
  option matcher for multiple choice (``huatuogpt_vision.py``), quirks included.

Every summary carries both: the chosen protocol's numbers under the plain keys (``close``,
``open_recall``, ``all``, ``accuracy``, ...) and each protocol's under suffixed keys
(``close_strict``, ``close_llava_med``, ``accuracy_llava_med``, ...); ``protocol`` names the
chosen one.
"""

from __future__ import annotations

__all__ = ["PROTOCOLS", "DEFAULT_PROTOCOL", "suffix", "check_protocol", "RULES"]

PROTOCOLS = ("strict", "llava-med")
DEFAULT_PROTOCOL = "strict"

RULES = {
    "vqa": {
        "strict": "closed: first yes/no word; open: answer-token recall (counts clipped)",
        "llava-med": "LLaVA-Med run_eval.py: closed 'yes'/'no' substring + answer substring; "
                     "open: calculate_f1score recall (prediction word multiplicities)",
    },
    "choice": {
        "strict": "option letter, then option text; otherwise unparsed (scored wrong, counted)",
        "llava-med": "HuatuoGPT-Vision match_choice3: letter, then last-mentioned option text, "
                     "then difflib similarity (a guess, counted)",
    },
}


def suffix(protocol: str) -> str:
    """Summary-key suffix of a protocol: ``strict`` -> ``strict``, ``llava-med`` -> ``llava_med``."""
    return check_protocol(protocol).replace("-", "_")


def check_protocol(protocol: str) -> str:
    """``protocol`` itself, or a ``ValueError`` naming the known ones."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown scoring protocol {protocol!r} (expected one of {', '.join(PROTOCOLS)})")
    return protocol
