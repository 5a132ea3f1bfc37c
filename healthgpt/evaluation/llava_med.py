"""LLaVA-Med's published VQA scorer (``llava/eval/run_eval.py`` + ``eval_metrics/``), rule for rule.

Most medical VQA tables (LLaVA-Med's, and the papers that copy its numbers) come from this
script. It is reproduced here, quirks included, so HealthGPT can be put next to them; the
project's own ``strict`` protocol (``vqa.py``) is the better measure.

**Normalisation** (``normalize_word``), applied to the lower-cased text:

1. Punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` (not ``:``, ``'``, ``.``, ``*``,
   ``%``, ``#`` ...): each mark is *deleted* everywhere when it touches a space somewhere in the
   text (``"yes, no"``: ``", "`` occurs, so every comma is deleted) or when the text holds a
   digit-comma-digit (``"1,000"``: every listed mark is deleted); otherwise each occurrence
   becomes a space (``"x-ray"`` -> ``"x ray"``, but ``"x-ray - left"`` -> ``"xray  left"``).
2. A period not followed by a digit is deleted (``"3.5"`` keeps its point), **at most 32 per
   call**: the script passes ``re.UNICODE`` (= 32) in ``Pattern.sub``'s ``count`` position. Its
   look-behind ``(?!<=\\d)`` is malformed (a look-ahead for ``"<="``) and never applies.
3. Split on whitespace; words ``none zero one .. ten`` become ``0 0 1 .. 10``; then ``a an the``
   are dropped; then each word found in the contraction table is replaced (``dont`` ->
   ``don't``, ``couldnt've`` -> ``couldn't've``; see ``CONTRACTIONS``); words joined by one space.

**Scores** (``pred``/``gt`` = ``normalize_word(text.lower())``, as ``run_eval.evaluate`` does):

- closed (``answer_type == "CLOSED"``, whatever the answer): 1 iff the substring ``"yes"`` or
  ``"no"`` occurs in ``pred`` *and* ``gt`` occurs in ``pred`` as a substring, else 0. So
  ``"not"``, ``"nodule"``, ``"know"`` and ``"normal"`` all carry a "no", and a
  non-yes/no closed answer (``"left lung"``) needs a stray "no"/"yes" in the prediction.
  The script in microsoft/LLaVA-Med appends *nothing* (instead of 0) when "yes"/"no" occurs
  but ``gt`` does not, so the accuracy it prints is ``hits / (hits + rows without yes/no)``;
  the copies that papers run append the 0. Both are computed (``closed_script_counts``).
- open ``calculate_f1score(pred, gt)`` (both normalised once more): word counts of each;
  ``tp`` = sum over words in both of the *prediction's* count (a repeated word counts twice),
  ``fp`` = prediction-only counts, ``fn`` = gt-only counts; ``precision = tp / (tp + fp)``,
  ``recall = tp / (tp + fn)``, ``f1`` their harmonic mean; all three 0 when either side is empty
  or ``tp == 0``. The paper's "open" number is the mean ``recall``.
- open ``calculate_exactmatch(pred, gt)``: distinct gt words present in ``pred`` divided by the
  number of prediction words (with repeats); 0 for an empty prediction.
- open "accuracy" with a candidate-answer set (``calculate_appearance_with_normalization``):
  each candidate (normalised once) scores ``|distinct pred words in candidate| / |distinct
  candidate words|``; the first best candidate is the answer, correct iff it equals ``gt``
  (``pred``/``gt`` normalised once more).

BLEU (nltk's ``sentence_bleu``) is not reproduced.
"""

from __future__ import annotations

import re
from collections import Counter

__all__ = ["normalize_word", "CONTRACTIONS", "score_closed", "f1_precision_recall", "exact_match",
           "candidate_accuracy", "load_candidates", "score_row"]

_PUNCT = ";/[]\"{}()=+\\_-><@`,?!"
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
_PERIODS_PER_CALL = 32          # re.UNICODE given as Pattern.sub's count
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})

# The script's contraction table maps spellings with one apostrophe left out onto the full
# form: a one-apostrophe word from its bare spelling (``dont`` -> ``don't``), a word with
# several apostrophes from each spelling that lacks exactly one of them (``couldnt've`` and
# ``couldn'tve`` -> ``couldn't've``; ``couldntve`` is *not* mapped). Its other entries:
_FULL_FORMS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've "
    "hasn't haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't "
    "she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd "
    "someone'd've someone'll someone's something'd something'd've something'll that's there'd "
    "there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've "
    "we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've "
    "who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll "
    "y'all'd've you'd you'd've you'll you're you've"
).split()
# ... its oddities: "somebody'd" is mapped the wrong way round, and "let's"/"she's" onto
# themselves (no effect). Its "I'd've", "I'm", "I've" keys hold capitals and can never match
# lower-cased text, so they are left out.
_ODD_ENTRIES = {"somebody'd": "somebodyd"}


def _one_apostrophe_dropped(word: str) -> list[str]:
    at = [i for i, ch in enumerate(word) if ch == "'"]
    return [word[:i] + word[i + 1:] for i in at]


CONTRACTIONS: dict[str, str] = {
    **{short: full for full in _FULL_FORMS for short in _one_apostrophe_dropped(full)},
    **_ODD_ENTRIES,
}


def normalize_word(text) -> str:
    """One pass of the script's ``normalize_word`` (rules in the module docstring); ``text`` is
    expected lower-cased already, as the script does before calling it."""
    text = "" if text is None else str(text)
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCT:
        touches_space = (mark + " ") in text or (" " + mark) in text
        out = out.replace(mark, "" if (delete_all or touches_space) else " ")
    out = _PERIOD.sub("", out, count=_PERIODS_PER_CALL)
    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def _norm(text, passes: int = 1) -> str:
    text = "" if text is None else str(text).lower()
    for _ in range(passes):
        text = normalize_word(text)
    return text


def score_closed(prediction, answer) -> int:
    """1/0 of the script's closed rule on raw texts (``"yes"``/``"no"`` substring and the answer
    as a substring)."""
    pred, gt = _norm(prediction), _norm(answer)
    return int(("yes" in pred or "no" in pred) and gt in pred)


def _has_yes_no(prediction) -> bool:
    pred = _norm(prediction)
    return "yes" in pred or "no" in pred


def f1_precision_recall(prediction, answer) -> tuple[float, float, float]:
    """``(f1, precision, recall)`` of ``calculate_f1score`` on raw texts (normalised twice, as the
    script normalises in ``evaluate`` and again inside the routine)."""
    pred, gt = Counter(_norm(prediction, 2).split()), Counter(_norm(answer, 2).split())
    if not pred or not gt:
        return 0.0, 0.0, 0.0
    tp = sum(c for w, c in pred.items() if w in gt)     # the prediction's multiplicity
    fp = sum(c for w, c in pred.items() if w not in gt)
    fn = sum(c for w, c in gt.items() if w not in pred)
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall), precision, recall


def exact_match(prediction, answer) -> float:
    """``calculate_exactmatch``: distinct answer words found in the prediction / prediction words."""
    pred, gt = Counter(_norm(prediction, 2).split()), Counter(_norm(answer, 2).split())
    total = sum(pred.values())
    return sum(1 for w in gt if w in pred) / total if total else 0.0


def candidate_accuracy(prediction, answer, candidates: list) -> float:
    """``calculate_appearance_with_normalization``: 1.0 when the candidate closest to the
    prediction (first best) equals the answer, else 0.0."""
    if not candidates:
        raise ValueError("the candidate-answer set is empty")
    pred_words = set(_norm(prediction, 2).split())
    gt = _norm(answer, 2)
    best, best_sim = None, -1.0
    for cand in candidates:
        cand = normalize_word(str(cand))
        cand_words = set(cand.split())
        sim = len(pred_words & cand_words) / len(cand_words) if cand_words else 0.0
        if sim > best_sim:
            best, best_sim = cand, sim
    return 1.0 if best == gt else 0.0


def load_candidates(data) -> list:
    """The candidate answers from a parsed JSON file: a list, or LLaVA-Med's
    ``train_open_answers.json`` object (``{"0": [...]}``, the script reads key ``"0"``)."""
    if isinstance(data, dict):
        if "0" not in data or not isinstance(data["0"], list):
            raise ValueError("candidate file: expected a list or an object with a list under key \"0\"")
        data = data["0"]
    if not isinstance(data, list) or not data:
        raise ValueError("candidate file: expected a non-empty list of answers")
    bad = [c for c in data if not isinstance(c, (str, int, float))]
    if bad:
        raise ValueError(f"candidate file: answers must be strings or numbers, got {bad[0]!r}")
    return data


def score_row(prediction, answer, answer_type: str, candidates: list | None = None) -> dict:
    """The script's per-question scores: closed ``{correct, yes_no_found}``; open ``{recall,
    precision, f1, exact, accuracy}`` (``accuracy`` is ``None`` without candidates)."""
    if answer_type == "closed":
        return {"correct": bool(score_closed(prediction, answer)),
                "yes_no_found": _has_yes_no(prediction)}
    f1, precision, recall = f1_precision_recall(prediction, answer)
    acc = candidate_accuracy(prediction, answer, candidates) if candidates else None
    return {"recall": recall, "precision": precision, "f1": f1,
            "exact": exact_match(prediction, answer), "accuracy": acc}
