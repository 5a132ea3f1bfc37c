"""Multiple-choice scoring (OmniMedVQA, MMMU-Med, and VQA questions that carry options).

Two protocols (``protocols.py``); every scored row carries both, the summary both accuracies.

``strict`` maps a free-text prediction onto one option in two steps, the first that succeeds
wins, and never guesses:

1. **Option letter** (``extract_letter``), read from the raw prediction; the letter must be an
   upper-case letter naming an existing option:
   - the whole prediction is a letter, optionally bracketed or followed by ``.``/``:``/``)``:
     ``"B"``, ``"(B)"``, ``"b."`` (a lone letter may be lower case);
   - after ``answer is`` / ``answer:`` / ``option`` / ``choice`` (any case): ``"The answer is (C)"``,
     ``"Answer: D"``; but not an ``A``/``I`` followed by a lower-case word (``"Answer: A small
     mass"`` is text);
   - at the start, followed by ``.``, ``:`` or ``)``: ``"B. Lung"``, ``"C) MRI"``
     (``"A large mass"`` is *not* a letter: the article has no punctuation after it);
   - the first bracketed letter anywhere: ``"I think (D) is right"``.
2. **Option text**: options whose normalised text (``normalise.normalise_answer``) occurs as a
   contiguous run of whole tokens in the normalised prediction. The longest such option wins
   (``"lung cancer"`` beats ``"lung"``).

A prediction matching neither (``"lungs"``, ``""``, or a tie between two different options) is
**unparsed**: ``picked`` is ``None``, it scores wrong and the summary counts it (``unparsed``).

``llava-med`` uses HuatuoGPT-Vision's published matcher (``huatuogpt_vision.match_option``),
whose last step picks the most similar option by ``difflib``: rows it guessed are counted in
``picked_by.similarity``, rows whose letter names no option in ``unparsed``.

The ground truth (``gt``) may be a letter (MMMU: ``"B"``) or an option's text (OmniMedVQA:
``"Lung"``); ``gt_index`` resolves either. A prediction is correct when it picks the gt option.

Accuracy per modality uses ``normalise.canonical_modality``; the overall ``accuracy`` of a
benchmark with Table 9 modalities is the unweighted mean over those modality columns (this is how
the paper's Table 9 "Avg." and Table 1 "OMVQA" are computed: 68.5 for HealthGPT-M3 is the mean of
its seven columns), ``accuracy_micro`` is over all questions.
"""

from __future__ import annotations

import re
from collections import defaultdict

from healthgpt.evaluation.huatuogpt_vision import match_option
from healthgpt.evaluation.normalise import TABLE9_MODALITIES, canonical_modality, contains_tokens, normalise_answer, tokens
from healthgpt.evaluation.protocols import DEFAULT_PROTOCOL, PROTOCOLS, RULES, check_protocol, suffix

__all__ = ["LETTERS", "extract_letter", "match_choice", "gt_index", "score_choice",
           "score_choice_row", "choice_prompt", "summarise_choice", "summarise_choice_protocols"]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_LONE = re.compile(r"^\s*[\(\[]?([A-Za-z])[\)\]]?[\.:]?\s*$")
# "A"/"I" followed by a lower-case word is an article/pronoun ("The answer is a mass" never
# matches anyway: letters must be upper case; "Answer: A small mass" must not match either).
_AFTER_WORD = re.compile(r"(?i:answer\s*(?:is|:)|options?|choices?)\s*[:\-]?\s*[\(\[]?"
                         r"([A-Z])(?![A-Za-z])(?<![AI](?=\s+[a-z]))")
_LEADING = re.compile(r"^\s*[\(\[]?([A-Z])[\)\]\.:](?=\s|$)")
_BRACKETED = re.compile(r"[\(\[]([A-Z])[\)\]]")


def extract_letter(prediction: str, n_options: int) -> int | None:
    """Index of the option letter named in ``prediction`` (rules in the module docstring)."""
    if not prediction:
        return None
    text = str(prediction)
    for pattern in (_LONE, _AFTER_WORD, _LEADING, _BRACKETED):
        for m in pattern.finditer(text):
            idx = LETTERS.index(m.group(1).upper())
            if idx < n_options:
                return idx
    return None


def match_choice(prediction: str, options: list[str]) -> tuple[int | None, str]:
    """``(index, method)``: the option ``prediction`` picks under the strict rules and how
    (``letter`` | ``text``), or ``(None, "none")`` when it picks none (unparsed)."""
    if not options:
        return None, "none"
    idx = extract_letter(prediction, len(options))
    if idx is not None:
        return idx, "letter"
    pred_tokens = tokens(prediction)
    if not pred_tokens:
        return None, "none"
    opt_tokens = [tokens(o) for o in options]
    hits = [(len(t), i) for i, t in enumerate(opt_tokens) if contains_tokens(pred_tokens, t)]
    if hits:
        longest = max(n for n, _ in hits)
        best = {tuple(opt_tokens[i]) for n, i in hits if n == longest}
        if len(best) == 1:
            return min(i for n, i in hits if n == longest), "text"
    return None, "none"


def gt_index(gt, options: list[str]) -> int | None:
    """Index of the ground-truth option: a letter (``"B"``, ``"(b)"``) or an option's text."""
    if gt is None or not options:
        return None
    m = _LONE.match(str(gt))
    if m and LETTERS.index(m.group(1).upper()) < len(options):
        return LETTERS.index(m.group(1).upper())
    g = normalise_answer(gt)
    for i, o in enumerate(options):
        if normalise_answer(o) == g:
            return i
    return None


def score_choice(prediction: str, gt, options: list[str], protocol: str = DEFAULT_PROTOCOL) -> dict:
    """Score one multiple-choice prediction under ``protocol``:
    ``{correct, picked, picked_by, gt_index}`` (letters, ``picked`` ``None`` when unparsed).

    When the gt matches no option (a data error) the picked option's normalised text is
    compared with the normalised gt instead.
    """
    if check_protocol(protocol) == "strict":
        picked, method = match_choice(prediction, options)
    else:
        picked, method, _ = match_option(prediction, options)
    gi = gt_index(gt, options)
    if gi is not None:
        correct = picked is not None and picked == gi
    else:
        correct = picked is not None and normalise_answer(options[picked]) == normalise_answer(gt)
    return {"correct": bool(correct), "picked": None if picked is None else LETTERS[picked],
            "picked_by": method, "gt_index": None if gi is None else LETTERS[gi]}


def score_choice_row(prediction: str, gt, options: list[str], protocol: str = DEFAULT_PROTOCOL) -> dict:
    """Both protocols' ``score_choice`` (under ``strict`` / ``llava_med``) and, at the top level,
    the chosen protocol's ``correct``/``picked``/``picked_by``/``gt_index``."""
    both = {suffix(p): score_choice(prediction, gt, options, p) for p in PROTOCOLS}
    return {**both[suffix(protocol)], "protocol": protocol, **both}


def choice_prompt(question: str, options: list[str]) -> str:
    """The prompt shown to the model for a multiple-choice question (LLaVA's MC format)."""
    lines = [str(question).strip()]
    lines += [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    lines.append("Answer with the option's letter from the given choices directly.")
    return "\n".join(lines)


def _pct(values) -> float | None:
    values = list(values)
    return round(100.0 * sum(values) / len(values), 4) if values else None


def summarise_choice(scored: list[dict], macro_over_modalities: bool = True) -> dict:
    """Summary of scored multiple-choice rows (each with ``correct`` and optional ``modality``).

    Returns ``accuracy`` (percent; the mean over the Table 9 modality columns present when
    ``macro_over_modalities`` and any are present, else over all questions), ``accuracy_micro``,
    one key per modality present (Table 9 names first), ``modalities`` (``{name: {accuracy, n}}``)
    and ``n``.
    """
    by_mod: dict[str, list[bool]] = defaultdict(list)
    for r in scored:
        mod = canonical_modality(r.get("modality"))
        if mod is not None:
            by_mod[mod].append(bool(r["correct"]))
    micro = _pct(bool(r["correct"]) for r in scored)
    table9 = [m for m in TABLE9_MODALITIES if m in by_mod]
    if macro_over_modalities and table9:
        accuracy = round(sum(_pct(by_mod[m]) for m in table9) / len(table9), 4)
        basis = "mean over Table 9 modalities: " + ", ".join(table9)
    else:
        accuracy, basis = micro, "all questions"
    order = table9 + sorted(m for m in by_mod if m not in TABLE9_MODALITIES)
    out = {"accuracy": accuracy, "accuracy_basis": basis, "accuracy_micro": micro, "n": len(scored)}
    for m in order:
        out[m] = _pct(by_mod[m])
    out["modalities"] = {m: {"accuracy": _pct(by_mod[m]), "n": len(by_mod[m])} for m in order}
    out["picked_by"] = {k: sum(1 for r in scored if r.get("picked_by") == k)
                        for k in ("letter", "text", "similarity", "none")}
    out["unparsed"] = sum(1 for r in scored if r.get("picked", "") is None)
    return out


def summarise_choice_protocols(scored: list[dict], macro_over_modalities: bool = True,
                               protocol: str = DEFAULT_PROTOCOL) -> dict:
    """Summary of ``score_choice_row`` rows: the chosen protocol's ``summarise_choice`` under the
    plain keys, plus ``accuracy_<p>``, ``accuracy_micro_<p>``, ``unparsed_<p>``, ``picked_by_<p>``
    and ``modalities_<p>`` for both protocols, ``protocol`` and ``rules`` (what each protocol did)."""
    out = {}
    for p in PROTOCOLS:
        sx = suffix(p)
        view = [{"modality": r.get("modality"), **r[sx]} for r in scored]
        s = summarise_choice(view, macro_over_modalities)
        if p == check_protocol(protocol):
            out = {**s, **out}
        for k in ("accuracy", "accuracy_micro", "unparsed", "picked_by", "modalities"):
            out[f"{k}_{sx}"] = s[k]
    out["protocol"] = protocol
    out["rules"] = dict(RULES["choice"])
    return out
