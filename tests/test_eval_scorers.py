"""Text scorers of healthgpt.evaluation on hand-built cases with known answers."""

import math

import pytest

from healthgpt.evaluation.choice import extract_letter, gt_index, match_choice, score_choice, summarise_choice
from healthgpt.evaluation.normalise import canonical_modality, is_yes_no, normalise_answer, yes_no
from healthgpt.evaluation.scoring import score_text_rows
from healthgpt.evaluation.vqa import answer_type_of, open_recall, score_closed, score_vqa_row, summarise_vqa


@pytest.mark.parametrize("raw, norm", [
    ("Yes.", "yes"),
    ("  NO!! ", "no"),
    ("No, there isn't.", "no there is not"),
    ("The answer is two", "answer is 2"),
    ("1,000 mg", "1000 mg"),
    ("3.5 cm", "3.5 cm"),
    ("end of sentence.", "end of sentence"),
    ("X-ray", "x ray"),
    ("the heart's apex", "heart apex"),
    ("Left\u2013Lung", "left lung"),
    ("\u201cPneumonia\u201d", "pneumonia"),
    ("An MRI", "mri"),
    (None, ""),
    (12, "12"),
])
def test_normalise_answer(raw, norm):
    assert normalise_answer(raw) == norm


@pytest.mark.parametrize("text, polarity", [
    ("Yes", "yes"), ("yes, the lesion is malignant", "yes"), ("No.", "no"),
    ("No, there is no fracture.", "no"), ("There is no evidence of pneumothorax", "no"),
    ("Yes, but no effusion", "yes"), ("Nope", "no"), ("The heart is not enlarged", None),
    ("nothing abnormal", None), ("", None), ("yesterday", None),
])
def test_yes_no(text, polarity):
    assert yes_no(text) == polarity


def test_answer_type_inference():
    assert answer_type_of("Yes") == "closed"
    assert answer_type_of("no.") == "closed"
    assert answer_type_of("left lung") == "open"
    assert answer_type_of("Left Lung", "CLOSED") == "closed"   # SLAKE
    assert answer_type_of("yes", "OPEN") == "open"            # the file's word wins
    assert answer_type_of("2", " CLOSED ") == "closed"        # VQA-RAD has stray spaces
    with pytest.raises(ValueError):
        answer_type_of("x", "maybe")
    assert is_yes_no("Yes!") and not is_yes_no("yes and no")


def test_closed_scoring():
    assert score_closed("Yes.", "yes")
    assert score_closed("No, there is no fracture.", "No")
    assert not score_closed("The heart is enlarged", "yes")    # no polarity: wrong
    assert not score_closed("not enlarged", "no")              # 'not' is not 'no'
    assert not score_closed("Yes", "no")
    # non yes/no closed answers (SLAKE): whole-token containment, or options when given
    assert score_closed("It is the left lung", "Left Lung")
    assert not score_closed("lungs", "lung")
    assert score_closed("B", "Right", options=["Left", "Right"])


def test_open_recall():
    assert open_recall("There are 2 lesions", "Two") == 1.0
    assert open_recall("lower lobe", "left lower lobe") == pytest.approx(2 / 3)
    assert open_recall("", "brain") == 0.0
    assert open_recall("anything", "") == 0.0
    assert open_recall("lobe", "lobe lobe") == 0.5          # counts are clipped
    assert open_recall("The Left-Lung.", "left lung") == 1.0


VQA_ROWS = [
    dict(id="1", answer="yes", prediction="Yes."),
    dict(id="2", answer="no", prediction="No, there is no fracture."),
    dict(id="3", answer="No", prediction="There is no evidence of a mass."),
    dict(id="4", answer="yes", prediction="The heart is enlarged"),
    dict(id="5", answer="no", prediction="not enlarged"),
    dict(id="6", answer="Left Lung", answer_type="CLOSED", prediction="the left lung"),
    dict(id="7", answer="Two", prediction="There are 2 lesions"),
    dict(id="8", answer="left lower lobe", prediction="lower lobe"),
    dict(id="9", answer="brain", prediction=""),
]


def test_vqa_summary_known_values():
    summary, scored = score_text_rows("vqa-rad", VQA_ROWS)
    assert [s["answer_type"] for s in scored] == ["closed"] * 6 + ["open"] * 3
    assert [s.get("correct") for s in scored[:6]] == [True, True, True, False, False, True]
    assert summary["n"] == 9 and summary["n_closed"] == 6 and summary["n_open"] == 3
    assert summary["close"] == pytest.approx(100 * 4 / 6, abs=1e-3)
    assert summary["open_scoring"] == "recall"
    assert summary["open"] == pytest.approx(100 * 5 / 9, abs=1e-3)
    assert summary["all"] == pytest.approx(100 * (4 + 5 / 3) / 9, abs=1e-3)
    assert summary["open_choice"] is None and summary["all_choice"] is None
    assert summary["closed_unparsed"] == 2


def test_vqa_open_as_multiple_choice():
    rows = [
        dict(id="c", answer="yes", prediction="yes"),
        dict(id="o1", answer="Liver", prediction="It is the liver", options=["Liver", "Spleen"]),
        dict(id="o2", answer="Spleen", prediction="(A)", options=["Liver", "Spleen"]),
    ]
    scored = [score_vqa_row(r) for r in rows]
    auto = summarise_vqa(scored)
    assert auto["open_scoring"] == "choice"
    assert auto["open"] == 50.0 and auto["close"] == 100.0
    assert auto["all"] == pytest.approx(100 * 2 / 3, abs=1e-3)
    assert auto["open_recall"] == 50.0          # o1 recall 1, o2 recall 0
    rec = summarise_vqa(scored, "recall")
    assert rec["open_scoring"] == "recall" and rec["open"] == 50.0
    with pytest.raises(ValueError):
        summarise_vqa([score_vqa_row(dict(id="x", answer="liver", prediction="liver"))], "choice")


def test_vqa_only_closed_or_only_open():
    s = summarise_vqa([score_vqa_row(dict(id="1", answer="yes", prediction="no"))])
    assert s["close"] == 0.0 and s["open"] is None and s["all"] == 0.0
    s = summarise_vqa([score_vqa_row(dict(id="1", answer="liver", prediction="liver"))])
    assert s["close"] is None and s["open"] == 100.0 and s["all"] == 100.0


OPTS = ["Liver", "Lung", "Lung cancer", "Heart"]


@pytest.mark.parametrize("pred, idx, how", [
    ("B", 1, "letter"), ("(b)", 1, "letter"), ("C.", 2, "letter"), ("The answer is (C)", 2, "letter"),
    ("Answer: D", 3, "letter"), ("B. Lung", 1, "letter"), ("C) Lung cancer", 2, "letter"),
    ("I think (D) fits", 3, "letter"), ("option B", 1, "letter"),
    ("Lung", 1, "text"), ("It shows lung cancer", 2, "text"),          # longest option wins
    ("A large mass in the lung", 1, "text"),                          # 'A' here is an article
    ("Answer: A small liver", 0, "text"),
    ("lungs", None, "none"), ("hart", None, "none"),               # strict never guesses: unparsed
    ("", None, "none"),
])
def test_match_choice(pred, idx, how):
    assert match_choice(pred, OPTS) == (idx, how)


def test_letter_and_gt_resolution():
    assert extract_letter("F", 4) is None
    assert extract_letter("The answer is B because", 4) == 1
    assert gt_index("B", OPTS) == 1 and gt_index("(c)", OPTS) == 2
    assert gt_index("lung cancer", OPTS) == 2
    assert gt_index("kidney", OPTS) is None
    # ambiguous text tie between two different options: unparsed, not a guess
    assert match_choice("liver and heart", OPTS) == (None, "none")
    r = score_choice("lung", "Lung", OPTS)
    assert r == {"correct": True, "picked": "B", "picked_by": "text", "gt_index": "B"}
    assert score_choice("", "Lung", OPTS) == {"correct": False, "picked": None, "picked_by": "none",
                                              "gt_index": "B"}


def test_modalities():
    for label, name in [("CT(Computed Tomography)", "CT"), ("X-Ray", "X-ray"), ("Fundus Photography", "FDM"),
                        ("Microscopy Images", "MiS"), ("OCT (Optical Coherence Tomography)", "OCT"),
                        ("MR (Mag-netic Resonance Imaging)", "MRI"), ("Ultrasound", "USS"),
                        ("Dermoscopy", "Dermoscopy"), ("", None), (None, None)]:
        assert canonical_modality(label) == name


def test_choice_summary_macro_and_micro():
    scored = ([{"correct": True, "modality": "CT"}] * 3 + [{"correct": False, "modality": "CT"}]
              + [{"correct": False, "modality": "Ultrasound"}]
              + [{"correct": True, "modality": "Dermoscopy"}])
    s = summarise_choice(scored)
    assert s["CT"] == 75.0 and s["USS"] == 0.0 and s["Dermoscopy"] == 100.0
    assert s["accuracy"] == 37.5                       # mean of the Table 9 columns present
    assert s["accuracy_micro"] == pytest.approx(400 / 6, abs=1e-3)
    assert s["modalities"]["CT"] == {"accuracy": 75.0, "n": 4}
    assert list(s["modalities"]) == ["CT", "USS", "Dermoscopy"]
    s = summarise_choice(scored, macro_over_modalities=False)
    assert s["accuracy"] == s["accuracy_micro"]


def test_paper_table9_average_is_macro():
    # HealthGPT-M3's Table 9 columns average to its "Avg." 68.5
    cols = [35.3, 81.9, 54.6, 88.2, 89.3, 78.5, 51.4]
    assert round(sum(cols) / 7, 1) == 68.5
    assert math.isclose(round((73.7 + 55.9 + 74.6 + 56.4 + 78.7 + 39.7 + 43.3 + 68.5) / 8, 1), 61.3)


def test_choice_rows_via_score_text_rows():
    rows = [dict(id="1", answer="Lung", prediction="B", options=OPTS, modality="CT"),
            dict(id="2", answer="A", prediction="heart", options=OPTS)]
    s, scored = score_text_rows("mmmu-med", rows)
    assert [x["correct"] for x in scored] == [True, False]
    assert s["accuracy"] == 50.0          # mmmu-med: over questions
    s, _ = score_text_rows("omnimedvqa", rows)
    assert s["accuracy"] == 100.0 and s["CT"] == 100.0    # omnimedvqa: over modality columns


def test_rows_missing_fields_are_rejected():
    with pytest.raises(ValueError, match="lacks"):
        score_text_rows("slake", [dict(id="1", answer="yes")])
    with pytest.raises(ValueError, match="options"):
        score_text_rows("omnimedvqa", [dict(id="1", answer="A", prediction="A")])
