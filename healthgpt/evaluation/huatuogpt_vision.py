"""HuatuoGPT-Vision's published multiple-choice matcher (``match_choice3`` of its ``scorer.py``).

The first step that succeeds wins:

1. **Letter**: the first letter ``a``-``n`` / ``A``-``N`` that starts the text or follows a
   non-word character (or ``是``/``为``), is followed by a non-word character or the end, and is
   not an ``a``/``A`` followed by a space (the article). The letter is taken as it stands:
   ``"I think B"`` reads ``I``, ``"(c)"`` reads ``c``. The script then compares it with the
   upper-case answer label, so a lower-case letter or one naming no option is wrong; here such
   a row is reported as ``unmapped`` (``picked`` is ``None``), scored wrong as published.
2. **Option text**: options whose lower-cased text occurs in the lower-cased prediction as a
   plain substring (``"lung"`` is found in ``"lungs"``); the one whose *last* occurrence starts
   latest wins (the first option on ties).
3. **Similarity**: the option with the highest ``difflib.SequenceMatcher`` ratio against the
   lower-cased prediction, the *last* one on ties. This always picks something: it is a guess,
   and such rows are counted (``picked_by == "similarity"``).
"""

from __future__ import annotations

import difflib
import re

__all__ = ["match_option"]

_LETTERS = "ABCDEFGHIJKLMN"
_LETTER = re.compile(r"(?:^|[\W是为])(?![aA] )([a-nA-N])(?=\W|$)", re.S)


def match_option(prediction, options: list[str]) -> tuple[int | None, str, str | None]:
    """``(index, method, letter)`` for ``prediction`` over ``options`` (in letter order A, B, ...).

    ``method`` is ``letter`` | ``text`` | ``similarity`` | ``none`` (no options); ``letter`` is
    the letter step's raw find (``None`` when that step found nothing). ``index`` is ``None``
    when the letter names no option (lower case, or beyond the options)."""
    if not options:
        return None, "none", None
    text = "" if prediction is None else str(prediction)
    m = _LETTER.search(text)
    if m:
        letter = m.group(1)
        idx = _LETTERS.find(letter)            # -1 for a lower-case letter
        return (idx if 0 <= idx < len(options) else None), "letter", letter
    low = text.lower()
    opts = [str(o).lower() for o in options]
    found = [(low.rindex(o), i) for i, o in enumerate(opts) if o in low]
    if found:
        latest = max(pos for pos, _ in found)
        return min(i for pos, i in found if pos == latest), "text", None
    ratios = [difflib.SequenceMatcher(None, o, low).ratio() for o in opts]
    best = max(ratios)
    return max(i for i, r in enumerate(ratios) if r == best), "similarity", None
