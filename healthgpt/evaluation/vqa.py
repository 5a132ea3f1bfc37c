"""VQA-RAD / SLAKE / PathVQA scoring: closed (yes/no) accuracy, open recall, open multiple choice.

Per question (answers and predictions normalised by ``normalise.normalise_answer``):

- **closed** (``answer_type == "closed"``; inferred when the answer is a yes/no word):
  - yes/no answer: correct iff the prediction's polarity (``normalise.yes_no``: the first
    yes/no word) equals the answer's. ``"No, there is no fracture."`` is ``no``; a prediction
    without a yes/no word is wrong.
  - other closed answers (SLAKE has ``"Left Lung"``-style closed questions): with ``options``,
    multiple choice (``choice.score_choice``); without, correct iff the normalised answer occurs
    as a contiguous run of whole tokens in the normalised prediction.
- **open**, two scores:
  - ``recall`` (LLaVA-Med): ground-truth token recall,
    ``sum_w min(count_pred(w), count_gt(w)) / len(gt_tokens)`` over normalised tokens, in [0, 1].
  - ``choice`` (HuatuoGPT-Vision): 1/0 multiple choice over the row's ``options``; ``None``
    when the row has none.

Summary (percent, as the paper prints):

- ``close`` = mean closed correctness;
- ``open`` = mean open score under ``open_scoring``: ``"recall"``, ``"choice"``, or ``"auto"``
  (choice when *every* open question has options, else recall);
- ``all`` = (sum of closed scores + sum of open scores) / number of questions;
- ``open_recall``/``all_recall`` and ``open_choice``/``all_choice`` give both variants
  (``None`` where undefined). A metric over zero questions is ``None``.
"""

from __future__ import annotations

from collections import Counter

from healthgpt.evaluation.choice import score_choice
from healthgpt.evaluation.normalise import contains_tokens, is_yes_no, normalise_answer, tokens, yes_no

__all__ = ["answer_type_of", "score_closed", "open_recall", "score_vqa_row", "summarise_vqa"]

OPEN_SCORINGS = ("auto", "recall", "choice")


def answer_type_of(answer, answer_type=None) -> str:
    """``"closed"`` or ``"open"``: the given type (``"CLOSED"``, ``"close"``, ``"yes/no"``, ...)
    or, when missing, ``closed`` iff the answer is a yes/no word."""
    if answer_type is not None and str(answer_type).strip():
        t = str(answer_type).strip().lower()
        if t in ("closed", "close", "yes/no", "yes_no", "yesno", "binary"):
            return "closed"
        if t in ("open", "open-ended", "open_ended", "other", "number"):
            return "open"
        raise ValueError(f"unknown answer_type {answer_type!r} (expected closed or open)")
    return "closed" if is_yes_no(answer) else "open"


def score_closed(prediction, answer, options=None) -> bool:
    """Correctness of a closed question (rules in the module docstring)."""
    if is_yes_no(answer):
        return yes_no(prediction) == yes_no(answer)
    if options:
        return score_choice(prediction, answer, list(options))["correct"]
    return contains_tokens(tokens(prediction), tokens(answer))


def open_recall(prediction, answer) -> float:
    """LLaVA-Med recall of ground-truth tokens in the prediction, in [0, 1] (0 for an empty answer)."""
    gt = Counter(tokens(answer))
    total = sum(gt.values())
    if total == 0:
        return 0.0
    pred = Counter(tokens(prediction))
    return sum(min(c, pred[w]) for w, c in gt.items()) / total


def score_vqa_row(row: dict) -> dict:
    """Scores of one prediction row: ``{answer_type, correct | recall, choice, picked_by}``."""
    answer, pred = row.get("answer"), row.get("prediction")
    options = row.get("options") or None
    atype = answer_type_of(answer, row.get("answer_type"))
    out = {"id": row.get("id"), "answer_type": atype}
    if atype == "closed":
        out["correct"] = bool(score_closed(pred, answer, options))
    else:
        out["recall"] = open_recall(pred, answer)
        if options:
            c = score_choice(pred, answer, list(options))
            out["choice"] = 1.0 if c["correct"] else 0.0
            out["picked"], out["picked_by"] = c["picked"], c["picked_by"]
        else:
            out["choice"] = None
    out["normalised_prediction"] = normalise_answer(pred)
    out["normalised_answer"] = normalise_answer(answer)
    return out


def _pct(total: float, n: int) -> float | None:
    return round(100.0 * total / n, 4) if n else None


def summarise_vqa(scored: list[dict], open_scoring: str = "auto") -> dict:
    """Summary of ``score_vqa_row`` results (keys in the module docstring)."""
    if open_scoring not in OPEN_SCORINGS:
        raise ValueError(f"open_scoring must be one of {OPEN_SCORINGS}, got {open_scoring!r}")
    closed = [r for r in scored if r["answer_type"] == "closed"]
    opened = [r for r in scored if r["answer_type"] == "open"]
    n_closed, n_open, n = len(closed), len(opened), len(scored)
    closed_sum = float(sum(r["correct"] for r in closed))
    recall_sum = float(sum(r["recall"] for r in opened))
    has_choice = bool(opened) and all(r.get("choice") is not None for r in opened)
    choice_sum = float(sum(r["choice"] for r in opened)) if has_choice else None

    if open_scoring == "auto":
        used = "choice" if has_choice else "recall"
    else:
        used = open_scoring
    if used == "choice" and opened and not has_choice:
        raise ValueError("open_scoring='choice' needs options on every open question")
    open_sum = choice_sum if used == "choice" else recall_sum

    out = {
        "close": _pct(closed_sum, n_closed),
        "open": _pct(open_sum, n_open) if n_open else None,
        "all": _pct(closed_sum + (open_sum or 0.0), n),
        "open_scoring": used,
        "open_recall": _pct(recall_sum, n_open),
        "all_recall": _pct(closed_sum + recall_sum, n),
        "open_choice": _pct(choice_sum, n_open) if choice_sum is not None else None,
        "all_choice": _pct(closed_sum + choice_sum, n) if choice_sum is not None else None,
        "n": n, "n_closed": n_closed, "n_open": n_open,
        # closed yes/no questions whose prediction holds no yes/no word at all
        "closed_unparsed": sum(1 for r in closed if is_yes_no(r.get("normalised_answer"))
                               and yes_no(r.get("normalised_prediction")) is None),
    }
    return out
