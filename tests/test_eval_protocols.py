"""The two scoring protocols (strict, llava-med) on hand-made rows, one per published quirk.

Every expected value is worked out by hand from the published rules (LLaVA-Med's
``llava/eval/run_eval.py`` + ``eval_metrics/{glossary,evaluate_metrics,utils}.py``,
HuatuoGPT-Vision's ``match_choice3``) and from our strict rules; the comment beside each says how.
"""

import argparse
import json

import pytest

from healthgpt.cli import CLIError
from healthgpt.cli.eval import add_eval_arguments, run_eval
from healthgpt.evaluation import llava_med
from healthgpt.evaluation.huatuogpt_vision import match_option
from healthgpt.evaluation.report import table1
from healthgpt.evaluation.scoring import score_text_rows


def _args(*argv):
    return add_eval_arguments(argparse.ArgumentParser()).parse_args([str(a) for a in argv] + ["--no-progress"])


@pytest.mark.parametrize("text, norm", [
    ("x-ray", "x ray"),                      # '-' touches no space: becomes a space
    ("x-ray - left", "xray left"),           # ' - ' occurs: every '-' is deleted, x-ray -> xray
    ("yes, no", "yes no"),                   # ', ' occurs: the comma is deleted
    ("1,000 mg, left-side", "1000 mg leftside"),   # digit,digit: every listed mark deleted
    ("answer: yes", "answer: yes"),          # ':' is not in the script's list
    ("3.5 cm.", "3.5 cm"),                   # a period before a digit survives, the last goes
    ("the heart's apex", "heart's apex"),    # article dropped, apostrophe kept
    ("two", "2"), ("ten", "10"), ("eleven", "eleven"), ("none", "0"),   # number map stops at ten
    ("isnt", "isn't"), ("couldnt've", "couldn't've"), ("couldn'tve", "couldn't've"),
    ("couldntve", "couldntve"),              # only one-apostrophe-missing spellings are mapped
    ("somebody'd", "somebodyd"),             # the table's inverted entry
    ("a an the", ""),
])
def test_llava_med_normalize_word(text, norm):
    assert llava_med.normalize_word(text) == norm


def test_llava_med_period_limit_per_pass():
    # Pattern.sub(.., re.UNICODE) deletes at most 32 periods per call; the F1 routine runs
    # normalize_word twice (evaluate + calculate_f1score), so up to 64 trailing periods vanish.
    assert llava_med.normalize_word("lung" + "." * 40) == "lung" + "." * 8
    assert llava_med.f1_precision_recall("lung" + "." * 64, "lung")[2] == 1.0
    assert llava_med.f1_precision_recall("lung" + "." * 65, "lung")[2] == 0.0   # token 'lung.'


@pytest.mark.parametrize("pred, gt, published", [
    ("The heart is not enlarged", "no", 1),         # 'no' inside 'not'
    ("There is a nodule in the right lung.", "no", 1),   # 'no' inside 'nodule'
    ("I don't know.", "no", 1),                     # 'no' inside 'know'
    ("Yes, there is no effusion.", "no", 1),        # both words present: gt 'no' is a substring
    ("No.", "yes", 0),                              # has 'no', but 'yes' is not in 'no'
    ("The heart is enlarged", "yes", 0),            # neither 'yes' nor 'no'
    ("the left lung", "Left Lung", 0),              # a non-yes/no closed answer still needs yes/no
])
def test_llava_med_closed_rule(pred, gt, published):
    assert llava_med.score_closed(pred, gt) == published


def test_llava_med_open_scores_with_prediction_multiplicity():
    # gt 'left lobe', pred 'lobe lobe lobe': tp counts the prediction's 3 'lobe's, fn = 1 ('left'),
    # fp = 0 -> recall 3/4, precision 3/3, f1 = 2*1*0.75/1.75 = 6/7; exact match = 1 distinct gt
    # word found / 3 prediction words.
    f1, p, r = llava_med.f1_precision_recall("lobe lobe lobe", "left lobe")
    assert (r, p) == (0.75, 1.0) and f1 == pytest.approx(6 / 7)
    assert llava_med.exact_match("lobe lobe lobe", "left lobe") == pytest.approx(1 / 3)
    assert llava_med.f1_precision_recall("", "lung") == (0.0, 0.0, 0.0)
    assert llava_med.f1_precision_recall("liver", "lung") == (0.0, 0.0, 0.0)


def test_llava_med_candidate_accuracy():
    cands = ["left lung", "right lung", "liver"]
    # pred words {right, lung, is, affected}: 'left lung' 1/2, 'right lung' 2/2, 'liver' 0/1
    assert llava_med.candidate_accuracy("The right lung is affected", "right lung", cands) == 1.0
    # pred 'lung': 'left lung' and 'right lung' both 1/2: the first wins, which is not the gt
    assert llava_med.candidate_accuracy("lung", "right lung", cands) == 0.0
    assert llava_med.load_candidates({"0": cands}) == cands
    with pytest.raises(ValueError, match="non-empty"):
        llava_med.load_candidates([])
    with pytest.raises(ValueError, match="key"):
        llava_med.load_candidates({"answers": cands})


CLOSED = [  # (prediction, answer, answer_type, strict, llava-med)
    ("The heart is not enlarged", "no", None, 0, 1),      # strict: 'not' is no no-word
    ("There is a nodule in the right lung.", "no", None, 0, 1),
    ("I don't know.", "no", None, 0, 1),                   # strict: 'i do not know', no polarity
    ("Yes, there is no effusion.", "no", None, 0, 1),      # strict: the first yes/no word is 'yes'
    ("Yes.", "yes", None, 1, 1),
    ("The heart is enlarged", "yes", None, 0, 0),          # neither protocol finds yes/no
    ("the left lung", "Left Lung", "CLOSED", 1, 0),        # strict: whole-token containment
    ("No.", "yes", None, 0, 0),                            # the script drops this row (see below)
]
OPEN = [  # (prediction, answer, strict recall, llava-med recall)
    ("lobe lobe lobe", "left lobe", 0.5, 0.75),            # strict clips the count at the answer's 1
    ("There are 2 lesions", "two", 1.0, 1.0),              # 'two' -> '2' in both
    ("11", "eleven", 1.0, 0.0),                            # LLaVA-Med maps number words up to ten
    ("isnt", "isn't", 0.0, 1.0),                           # strict: "is not" vs 'isnt'; LLaVA-Med: both "isn't"
    ("A liver.", "the liver", 1.0, 1.0),                   # articles and the final period dropped
]


def _vqa_rows():
    rows = [dict(id=f"c{i}", prediction=p, answer=a, **({"answer_type": t} if t else {}))
            for i, (p, a, t, _, _) in enumerate(CLOSED)]
    rows += [dict(id=f"o{i}", prediction=p, answer=a, answer_type="open") for i, (p, a, _, _) in enumerate(OPEN)]
    return rows


@pytest.mark.parametrize("protocol", ["strict", "llava-med"])
def test_vqa_rows_under_both_protocols(protocol):
    summary, scored = score_text_rows("vqa-rad", _vqa_rows(), protocol=protocol)
    assert [s["strict"]["correct"] for s in scored[:8]] == [bool(c[3]) for c in CLOSED]
    assert [s["llava_med"]["correct"] for s in scored[:8]] == [bool(c[4]) for c in CLOSED]
    assert [s["strict"]["recall"] for s in scored[8:]] == [o[2] for o in OPEN]
    assert [s["llava_med"]["recall"] for s in scored[8:]] == [o[3] for o in OPEN]
    # closed: strict 2/8 = 25 %, llava-med 5/8 = 62.5 %; open recall: strict 3.5/5 = 70 %,
    # llava-med 3.75/5 = 75 %; all = (closed + open recall) / 13.
    both = {"close_strict": 25.0, "close_llava_med": 62.5, "open_recall_strict": 70.0,
            "open_recall_llava_med": 75.0, "all_strict": 100 * 5.5 / 13, "all_llava_med": 100 * 8.75 / 13}
    for k, v in both.items():
        assert summary[k] == pytest.approx(v, abs=1e-3), k
    sx = "strict" if protocol == "strict" else "llava_med"
    for k in ("close", "open_recall", "all"):
        assert summary[k] == summary[f"{k}_{sx}"]
    assert summary["protocol"] == protocol
    assert summary["closed_llava_med_only"] == 4 and summary["closed_strict_only"] == 1
    assert summary["closed_unparsed"] == 4       # yes/no answers without a yes/no word: rows 0, 1, 2, 5
    # microsoft/LLaVA-Med's run_eval.py appends nothing for 'No.' vs 'yes' (has 'no', lacks the
    # answer): it prints 5 hits / (5 + 2 rows without yes/no) = 71.43 %
    assert summary["close_llava_med_script"] == pytest.approx(500 / 7, abs=1e-3)
    assert summary["closed_llava_med_dropped"] == 1
    # precision: 1, 1/4, 0, 1, 1 -> 65 %; F1: 6/7, 2*(1/4)*1/(5/4) = 0.4, 0, 1, 1;
    # exact: 1/3, 1/4, 0, 1, 1
    assert summary["open_precision_llava_med"] == pytest.approx(65.0, abs=1e-3)
    assert summary["open_f1_llava_med"] == pytest.approx(100 * (6 / 7 + 0.4 + 2) / 5, abs=1e-3)
    assert summary["open_exact_llava_med"] == pytest.approx(100 * (1 / 3 + 1 / 4 + 2) / 5, abs=1e-3)
    assert summary["open_accuracy_llava_med"] is None          # no candidate set given


OPTS = ["Liver", "Lung", "Lung cancer", "Heart"]
CHOICE = [  # (prediction, strict pick, strict method, huatuo pick, huatuo method); the gt is Lung (B)
    ("B", "B", "letter", "B", "letter"),
    ("I think B", None, "none", None, "letter"),            # HuatuoGPT reads the pronoun 'I'
    ("(b)", "B", "letter", None, "letter"),                 # HuatuoGPT keeps 'b', never equal to 'B'
    ("lungs", None, "none", "B", "text"),                   # 'lung' is a substring of 'lungs'
    ("liver and heart", None, "none", "D", "text"),         # strict: a tie; HuatuoGPT: last mentioned
    ("hart", None, "none", "D", "similarity"),              # ratio heart/hart = 2*4/9, the highest
    ("", None, "none", "D", "similarity"),                  # all ratios 0: the last option (>=)
]


def test_multiple_choice_protocols_and_unparsed_rows():
    rows = [dict(id=str(i), prediction=p, answer="Lung", options=OPTS) for i, (p, *_) in enumerate(CHOICE)]
    summary, scored = score_text_rows("mmmu-med", rows, protocol="llava-med")
    for s, (_, sp, sm, hp, hm) in zip(scored, CHOICE):
        assert (s["strict"]["picked"], s["strict"]["picked_by"]) == (sp, sm)
        assert (s["llava_med"]["picked"], s["llava_med"]["picked_by"]) == (hp, hm)
    # strict right on 'B' and '(b)'; HuatuoGPT right on 'B' and 'lungs': 2/7 each, different rows
    assert summary["accuracy_strict"] == summary["accuracy_llava_med"] == pytest.approx(200 / 7, abs=1e-3)
    assert summary["unparsed_strict"] == 5 and summary["unparsed_llava_med"] == 2
    assert summary["picked_by_llava_med"] == {"letter": 3, "text": 2, "similarity": 2, "none": 0}
    assert summary["protocol"] == "llava-med" and "HuatuoGPT" in summary["rules"]["llava-med"]
    assert summary["unparsed"] == 2 and summary["accuracy"] == summary["accuracy_llava_med"]


def test_huatuo_letter_rule_details():
    # 'A ' is the article and skipped; the next free-standing letter is 'C' after '('
    assert match_option("A mass, so (C)", OPTS) == (2, "letter", "C")
    assert match_option("C. Lung cancer", OPTS) == (2, "letter", "C")
    assert match_option("Lung", OPTS)[:2] == (1, "text")       # 'L' is followed by a word char
    # no free-standing letter ('A ' is the article), no option text: a similarity guess
    assert match_option("Answer: A small mass", OPTS)[1] == "similarity"
    assert match_option("anything", []) == (None, "none", None)


def test_cli_protocol_writes_both_key_sets(tmp_path):
    p = tmp_path / "pred.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in _vqa_rows()))
    out = tmp_path / "o"
    assert run_eval(_args("--bench", "vqa-rad", "--predictions", p, "--protocol", "llava-med", "--out", out)) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["protocol"] == "llava-med"
    assert s["close"] == s["close_llava_med"] == 62.5 and s["close_strict"] == 25.0
    assert s["open_recall"] == 75.0 and s["open_recall_strict"] == 70.0
    table = (out / "table.md").read_text()
    # chosen protocol first, each row labelled with its protocol
    assert table.index("| predictions [llava-med] | 62.5 | 67.3 |") < table.index("| predictions [strict] | 25.0 | 42.3 |")
    assert "[llava-med] = the published scorers" in table
    default = tmp_path / "d"
    assert run_eval(_args("--bench", "vqa-rad", "--predictions", p, "--out", default)) == 0
    d = json.loads((default / "summary.json").read_text())
    assert d["protocol"] == "strict" and d["close"] == 25.0 and d["close_llava_med"] == 62.5


def test_cli_candidates(tmp_path, capsys):
    rows = [dict(id="1", prediction="The right lung is affected", answer="right lung", answer_type="open"),
            dict(id="2", prediction="lung", answer="right lung", answer_type="open")]
    p = tmp_path / "pred.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cands = tmp_path / "train_open_answers.json"
    cands.write_text(json.dumps({"0": ["left lung", "right lung", "liver"]}))
    assert run_eval(_args("--bench", "slake", "--predictions", p, "--candidates", cands, "--out", tmp_path / "o")) == 0
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["open_accuracy_llava_med"] == 50.0              # row 1 right, row 2 picks 'left lung'
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    with pytest.raises(CLIError, match="non-empty"):  # healthgpt.cli.run_guarded reports it (exit status 2)
        run_eval(_args("--bench", "slake", "--predictions", p, "--candidates", bad, "--out", tmp_path / "b"))
    with pytest.raises(CLIError, match="VQA benchmarks"):
        run_eval(_args("--bench", "mmmu-med", "--predictions", p, "--candidates", cands, "--out", tmp_path / "c"))


def test_open_choice_unparsed_rows_are_counted():
    rows = [dict(id="1", answer="Liver", answer_type="open", prediction="It is the liver", options=["Liver", "Spleen"]),
            dict(id="2", answer="Spleen", answer_type="open", prediction="kidney", options=["Liver", "Spleen"])]
    summary, scored = score_text_rows("pathvqa", rows, protocol="llava-med")
    assert [s["picked"] for s in scored] == ["A", None]       # 'kidney' names neither option
    assert summary["open_scoring"] == "choice" and summary["open"] == 50.0
    assert summary["open_choice_unparsed"] == 1


def test_table_rows_from_a_summary_written_before_protocols():
    old = {"bench": "slake", "close": 50.0, "all": 60.0}          # no protocol keys: it was strict
    lines = table1({"slake": old}, "M").splitlines()
    assert lines[3:] == ["| M [strict] | - | - | 50.0 | 60.0 | - | - | - | - | - |"]
