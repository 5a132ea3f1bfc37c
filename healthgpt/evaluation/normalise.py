"""Answer normalisation shared by every text scorer.

``normalise_answer(text)`` applies, in this order:

1. ``None`` becomes ``""``; numbers and other non-strings become ``str(x)``.
2. Unicode NFKC, lower case; curly quotes become ``'``, en/em dashes become ``-``.
3. Contractions: ``n't`` -> `` not`` (``isn't`` -> ``is not``, ``can't`` -> ``can not``),
   ``'re`` -> `` are``, ``'s`` is dropped (``heart's`` -> ``heart``).
4. Thousands separators and decimal points between digits survive (``1,000`` -> ``1000``,
   ``3.5`` stays ``3.5``); every other punctuation mark (hyphens and slashes included)
   becomes a space, so ``x-ray`` -> ``x ray`` and ``Yes.`` -> ``yes``.
5. Number words ``zero`` .. ``twenty`` become digits (``two`` -> ``2``).
6. The articles ``a``, ``an`` and ``the`` are dropped.
7. Whitespace runs collapse to one space; leading/trailing space is removed.

``tokens(text)`` is ``normalise_answer(text).split()``.

The yes/no reading of a free-text prediction (``yes_no``) takes the *first* normalised token
that is in ``YES_WORDS`` or ``NO_WORDS``; a prediction with neither (``"the heart is
enlarged"``) has no polarity and scores as wrong on a closed question. ``not`` is *not* a
no-word (``"not enlarged"`` has no polarity; LLaVA-Med's substring test would read the ``no``
inside ``not``).

Modality labels (OmniMedVQA ``modality_type`` and friends) map onto the seven columns of the
paper's Table 9 with ``canonical_modality``.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = [
    "normalise_answer", "tokens", "yes_no", "is_yes_no", "contains_tokens",
    "YES_WORDS", "NO_WORDS", "TABLE9_MODALITIES", "canonical_modality",
]

YES_WORDS = frozenset({"yes", "yeah", "yep", "true", "correct"})
NO_WORDS = frozenset({"no", "nope", "false", "incorrect"})

_NUMBER_WORDS = {
    w: str(i) for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split())
}
_ARTICLES = frozenset({"a", "an", "the"})
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                         "\u2013": "-", "\u2014": "-", "\u2212": "-", "`": "'"})
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_DECIMAL = re.compile(r"(?<=\d)\.(?=\d)")
_PUNCT = re.compile(r"[^\w\s\x00]|_")


def normalise_answer(text) -> str:
    """Normalise an answer or a prediction for comparison (rules in the module docstring)."""
    if text is None:
        return ""
    if not isinstance(text, str):
        text = str(text)
    text = unicodedata.normalize("NFKC", text).lower().translate(_QUOTES)
    text = text.replace("n't", " not").replace("'re", " are").replace("'s", "")
    text = _THOUSANDS.sub("", text)
    text = _DECIMAL.sub("\x00", text)          # protect decimal points
    text = _PUNCT.sub(" ", text).replace("\x00", ".")
    words = []
    for w in text.split():
        w = _NUMBER_WORDS.get(w, w)
        if w not in _ARTICLES:
            words.append(w)
    return " ".join(words)


def tokens(text) -> list[str]:
    """Normalised whitespace tokens of ``text``."""
    return normalise_answer(text).split()


def yes_no(text) -> str | None:
    """``"yes"``, ``"no"`` or ``None``: the polarity of the first yes/no word in ``text``."""
    for w in tokens(text):
        if w in YES_WORDS:
            return "yes"
        if w in NO_WORDS:
            return "no"
    return None


def is_yes_no(answer) -> bool:
    """True when the whole normalised answer is one yes/no word (``"Yes"``, ``"no."``)."""
    t = tokens(answer)
    return len(t) == 1 and (t[0] in YES_WORDS or t[0] in NO_WORDS)


def contains_tokens(haystack: list[str], needle: list[str]) -> bool:
    """True when ``needle`` occurs as a contiguous run of whole tokens in ``haystack``."""
    n = len(needle)
    if n == 0:
        return False
    return any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


# ---- modalities (paper Table 9) -------------------------------------------------------------

TABLE9_MODALITIES = ("CT", "X-ray", "FDM", "MiS", "OCT", "MRI", "USS")

_MODALITY_RULES = (  # checked in order against the lower-cased label and its tokens
    ("OCT", ("optical coherence",), {"oct"}),
    ("CT", ("computed tomography",), {"ct"}),
    ("X-ray", ("x-ray", "x ray", "xray", "radiograph"), {"cxr", "xr"}),
    ("FDM", ("fundus",), {"fdm"}),
    ("MiS", ("microscop",), {"mis"}),
    ("MRI", ("magnetic", "mag-netic"), {"mr", "mri"}),
    ("USS", ("ultrasound", "sonograph"), {"us", "uss"}),
)


def canonical_modality(label) -> str | None:
    """Map a free modality label onto a Table 9 column name.

    ``"CT(Computed Tomography)"`` -> ``CT``, ``"X-Ray"`` -> ``X-ray``, ``"Fundus Photography"``
    -> ``FDM``, ``"Microscopy Images"`` -> ``MiS``, ``"OCT (Optical Coherence Tomography)"`` ->
    ``OCT``, ``"MR (Mag-netic Resonance Imaging)"`` -> ``MRI``, ``"Ultrasound"`` -> ``USS``.
    Labels outside the seven (``"Dermoscopy"``) come back stripped but otherwise unchanged;
    ``None``/empty gives ``None``.
    """
    if label is None:
        return None
    raw = str(label).strip()
    if not raw:
        return None
    low = raw.lower()
    toks = set(re.split(r"[^a-z0-9]+", low))
    for name, phrases, words in _MODALITY_RULES:
        if any(p in low for p in phrases) or toks & words:
            return name
    return raw
