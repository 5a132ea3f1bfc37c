"""VQA-RAD / SLAKE / PathVQA scoring: closed (yes/no) accuracy, open recall, open multiple choice.

Every question is scored under both protocols (``protocols.py``); the summary carries both.

``strict`` (answers and predictions normalised by ``normalise.normalise_answer``):

- **closed** (``answer_type == "closed"``; inferred when the answer is a yes/no word):
  - yes/no answer: correct iff the prediction's polarity (``normalise.yes_no``: the first
    yes/no word) equals the answer's. ``"No, there is no fracture."`` is ``no``; a prediction
    without a yes/no word is wrong (and counted in ``closed_unparsed``).
  - other closed answers (SLAKE has ``"Left Lung"``-style closed questions): with ``options``,
    multiple choice (``choice.score_choice``); without, correct iff the normalised answer occurs
    as a contiguous run of whole tokens in the normalised prediction.
- **open** ``recall``: ground-truth token recall,
  ``sum_w min(count_pred(w), count_gt(w)) / len(gt_tokens)`` over normalised tokens, in [0, 1].

``llava-med`` (``llava_med.py``): LLaVA-Med's ``run_eval.py``: closed = "yes"/"no" substring and
the answer as a substring; open ``recall`` = its ``calculate_f1score`` recall (a repeated
prediction word counts twice), plus its precision, F1, exact match, and the candidate-set
"open accuracy" when candidates are given.

Both: open ``choice`` (HuatuoGPT-Vision-style multiple choice over the row's ``options``, the
strict matcher; ``None`` without options).

Summary (percent, as the paper prints; a metric over zero questions is ``None``):

- ``close`` = mean closed correctness;
- ``open`` = mean open score under ``open_scoring``: ``"recall"``, ``"choice"``, or ``"auto"``
  (choice when *every* open question has options, else recall);
- ``all`` = (sum of closed scores + sum of open scores) / number of questions (LLaVA-Med's script
  prints no "all": under ``llava-med`` it is this formula over its closed and open scores);
- ``open_recall``/``all_recall`` and ``open_choice``/``all_choice`` give both variants.

These plain keys follow the chosen ``protocol``; ``close_<p>``, ``open_<p>``, ``all_<p>``,
``open_recall_<p>``, ``all_recall_<p>`` give each protocol's (``<p>`` = ``strict`` /
``llava_med``). LLaVA-Med extras: ``open_precision_llava_med``, ``open_f1_llava_med``,
``open_exact_llava_med``, ``open_accuracy_llava_med`` (``None`` without candidates), and
``close_llava_med_script`` = the accuracy microsoft/LLaVA-Med's own ``run_eval.py`` prints
(it drops, instead of counting as 0, a closed row whose prediction has "yes"/"no" but not the
answer; ``closed_llava_med_dropped`` counts those). Disagreements: ``closed_llava_med_only``
(right only under llava-med) and ``closed_strict_only``.
"""

from __future__ import annotations

from collections import Counter

from healthgpt.evaluation import llava_med
from healthgpt.evaluation.choice import score_choice
from healthgpt.evaluation.normalise import contains_tokens, is_yes_no, normalise_answer, tokens, yes_no
from healthgpt.evaluation.protocols import DEFAULT_PROTOCOL, PROTOCOLS, RULES, check_protocol, suffix

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


def score_vqa_row(row: dict, protocol: str = DEFAULT_PROTOCOL, candidates: list | None = None) -> dict:
    """Scores of one prediction row under both protocols (``strict`` and ``llava_med`` sub-dicts)
    and, at the top level, the chosen protocol's ``correct`` | ``recall``, plus ``choice``,
    ``picked``, ``picked_by`` for open rows."""
    check_protocol(protocol)
    answer, pred = row.get("answer"), row.get("prediction")
    options = row.get("options") or None
    atype = answer_type_of(answer, row.get("answer_type"))
    out = {"id": row.get("id"), "answer_type": atype, "protocol": protocol}
    if atype == "closed":
        strict = {"correct": bool(score_closed(pred, answer, options)),
                  "yes_no_found": yes_no(pred) is not None}
    else:
        strict = {"recall": open_recall(pred, answer)}
        if options:
            c = score_choice(pred, answer, list(options))
            out["choice"] = 1.0 if c["correct"] else 0.0
            out["picked"], out["picked_by"] = c["picked"], c["picked_by"]
        else:
            out["choice"] = None
    both = {"strict": strict, "llava_med": llava_med.score_row(pred, answer, atype, candidates)}
    key = "correct" if atype == "closed" else "recall"
    out[key] = both[suffix(protocol)][key]
    out.update(both)
    out["normalised_prediction"] = normalise_answer(pred)
    out["normalised_answer"] = normalise_answer(answer)
    return out


def _pct(total: float, n: int) -> float | None:
    return round(100.0 * total / n, 4) if n else None


def _open_used(opened: list[dict], open_scoring: str) -> tuple[str, float | None]:
    if open_scoring not in OPEN_SCORINGS:
        raise ValueError(f"open_scoring must be one of {OPEN_SCORINGS}, got {open_scoring!r}")
    has_choice = bool(opened) and all(r.get("choice") is not None for r in opened)
    used = ("choice" if has_choice else "recall") if open_scoring == "auto" else open_scoring
    if used == "choice" and opened and not has_choice:
        raise ValueError("open_scoring='choice' needs options on every open question")
    return used, (float(sum(r["choice"] for r in opened)) if has_choice else None)


def _protocol_block(closed: list[dict], opened: list[dict], n: int, used: str,
                    choice_sum: float | None) -> dict:
    closed_sum = float(sum(r["correct"] for r in closed))
    recall_sum = float(sum(r["recall"] for r in opened))
    open_sum = choice_sum if used == "choice" else recall_sum
    return {
        "close": _pct(closed_sum, len(closed)),
        "open": _pct(open_sum, len(opened)) if opened else None,
        "all": _pct(closed_sum + (open_sum or 0.0), n),
        "open_recall": _pct(recall_sum, len(opened)),
        "all_recall": _pct(closed_sum + recall_sum, n),
    }


def summarise_vqa(scored: list[dict], open_scoring: str = "auto", protocol: str = DEFAULT_PROTOCOL) -> dict:
    """Summary of ``score_vqa_row`` results (keys in the module docstring)."""
    check_protocol(protocol)
    closed = [r for r in scored if r["answer_type"] == "closed"]
    opened = [r for r in scored if r["answer_type"] == "open"]
    n_closed, n_open, n = len(closed), len(opened), len(scored)
    used, choice_sum = _open_used(opened, open_scoring)
    blocks = {p: _protocol_block([r[suffix(p)] for r in closed], [r[suffix(p)] for r in opened],
                                 n, used, choice_sum) for p in PROTOCOLS}
    chosen = blocks[protocol]
    closed_sum = float(sum(r[suffix(protocol)]["correct"] for r in closed))
    out = {
        "protocol": protocol,
        **chosen,
        "open_scoring": used,
        "open_choice": _pct(choice_sum, n_open) if choice_sum is not None else None,
        "all_choice": _pct(closed_sum + choice_sum, n) if choice_sum is not None else None,
        "n": n, "n_closed": n_closed, "n_open": n_open,
        # closed yes/no questions whose prediction holds no yes/no word at all
        "closed_unparsed": sum(1 for r in closed if is_yes_no(r.get("normalised_answer"))
                               and not r["strict"]["yes_no_found"]),
        "open_choice_unparsed": sum(1 for r in opened if r.get("choice") is not None and r.get("picked") is None),
    }
    for p, block in blocks.items():
        out.update({f"{k}_{suffix(p)}": v for k, v in block.items()})
    lm_open = [r["llava_med"] for r in opened]
    lm_closed = [r["llava_med"] for r in closed]
    hits = sum(r["correct"] for r in lm_closed)
    kept = hits + sum(1 for r in lm_closed if not r["yes_no_found"])
    has_acc = bool(lm_open) and all(r["accuracy"] is not None for r in lm_open)
    out.update({
        "open_precision_llava_med": _pct(sum(r["precision"] for r in lm_open), n_open),
        "open_f1_llava_med": _pct(sum(r["f1"] for r in lm_open), n_open),
        "open_exact_llava_med": _pct(sum(r["exact"] for r in lm_open), n_open),
        "open_accuracy_llava_med": _pct(sum(r["accuracy"] for r in lm_open), n_open) if has_acc else None,
        "close_llava_med_script": _pct(hits, kept),
        "closed_llava_med_dropped": n_closed - kept,
        "closed_llava_med_only": sum(1 for r in closed if r["llava_med"]["correct"] and not r["strict"]["correct"]),
        "closed_strict_only": sum(1 for r in closed if r["strict"]["correct"] and not r["llava_med"]["correct"]),
        "rules": dict(RULES["vqa"]),
    })
    return out
