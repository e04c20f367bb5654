"""Scoring rules of BENCHMARK.md, case by case."""

import pytest

from mllmcl.data.types import Sample
from mllmcl.evaluation import scorers as S
from mllmcl.evaluation.extract import extract_choice, extract_number, parse_choices


@pytest.mark.parametrize("p,a,expected", [
    ("yes", "yes", 1.0),
    ("Yes.", "yes", 1.0),           # one-word prediction: substring
    ("no", "yes", 0.0),
    ("the answer is yes", "yes", 1.0),
    ("look at the eyes", "yes", 0.0),  # spaced prediction needs " a", "a ", "a." or "a,"
    ("eyes are open", "yes", 1.0),     # ...which the reference checks one side at a time ("yes " matches)
    ("yes, it is", "yes", 1.0),
    ("2", "2.", 1.0),               # '.' dropped from a one-word answer
    ("there are 12", "2", 0.0),
    ("a residential area here", "residential area", 1.0),  # spaced answer: substring
    ("Unanswerable yes", "yes", 0.0),
])
def test_rs_ad(p, a, expected):
    assert S.rs_ad(p, a) == expected


def test_med_substring_and_unanswerable():
    assert S.med("Necrosis is present", "necrosis") == 1.0
    assert S.med("no", "yes") == 0.0
    assert S.med("unanswerable", "yes") == 0.0


def test_sci_exact_by_image_prefix_and_mapqa_partial_credit():
    assert S.sci("B", "b", "images/AI2D_001.png", "q") == 1.0
    assert S.sci("B. mitosis", "b", "images/AI2D_001.png", "q") == 0.0  # exact for AI2D
    assert S.sci("b", "b", "TQA_9.png", "q") == 1.0
    prompt = "Which states have the highest value?"
    assert S.sci("Texas, Ohio", "texas, ohio, utah, iowa", "MapQA_1.png", prompt) == 0.5
    assert S.sci("the value is 12", "12", "MapQA_2.png", "What is the value?") == 1.0
    assert S.sci("Unanswerable", "b", "AI2D_1.png", "q") == 0.0


def test_fin_normalised_exact():
    assert S.fin("A.", "A") == 1.0
    assert S.fin(" y e s ", "yes") == 1.0
    assert S.fin("A. rising", "A") == 0.0
    assert S.fin("Unanswerable", "A") == 0.0


def test_ocrbench():
    assert S.ocrbench("It says STOP here", ("stop",), "Regular Text Recognition") == 1.0
    assert S.ocrbench("it says go", ("stop", "go"), None) == 1.0
    assert S.ocrbench("x ^ 2 + 1", ("x^2+1",), S.HME) == 1.0
    assert S.ocrbench("X^2+1", ("x^2+1",), S.HME) == 0.0  # case kept for HME
    assert S.ocrbench("unanswerable stop", ("stop",), None) == 1.0  # OCR does not special-case it


def test_count():
    assert S.count("(B)", "(B)") == 1.0
    assert S.count("( b ).", "(B)") == 1.0
    assert S.count("(C)", "(B)") == 0.0
    assert S.count("3.", "3") == 1.0


def test_extraction_helpers():
    prompt = "Question: which?\nChoices:\n(A) the first bar\n(B) the second bar\n(C) the third bar"
    choices = parse_choices(prompt)
    assert choices == ["the first bar", "the second bar", "the third bar"]
    assert extract_choice("C", choices) == "C"
    assert extract_choice("The answer is (B).", choices) == "B"
    assert extract_choice("I think it is the third bar", choices) == "C"
    assert extract_choice("A. the first bar", choices) == "A"
    assert extract_choice("no idea", choices) is None
    assert extract_number("so the total is 1,250.5 units") == 1250.5
    assert extract_number("three bars") == 3.0
    assert extract_number("none") is None


def test_math_multiple_choice_and_free_form():
    mc = "Hint: ...\nQuestion: Which bar is the tallest?\nChoices:\n(A) the first bar\n(B) the second bar"
    meta = {"question_type": "multi_choice", "choices": ["the first bar", "the second bar"]}
    assert S.math("B", "B", mc, meta) == 1.0
    assert S.math("the second bar", "the second bar", mc, meta) == 1.0  # answer as option text
    assert S.math("A", "B", mc, meta) == 0.0
    ff = {"question_type": "free_form", "answer_type": "integer"}
    assert S.math("There are 4 bars.", "4", "How many?", ff) == 1.0
    assert S.math("4.5", "4", "How many?", ff) == 0.0
    assert S.math("3.14", "3.14159", "pi?", {"question_type": "free_form", "answer_type": "float",
                                              "precision": 2}) == 1.0


def test_choice_letter_match():
    prompt = "Which button?\nOptions:\nA. top left\nB. top right\nAnswer with the option's letter."
    assert S.choice("B", "B", prompt) == 1.0
    assert S.choice("top right", "B", prompt) == 1.0
    assert S.choice("A", "B", prompt) == 0.0


def test_dispatch_by_task_scorer():
    s = Sample(uid="1", task="Sci", split="test", image="/x/images/AI2D_1.png", image_rel="images/AI2D_1.png",
               question="q", answer="C")
    assert S.score("sci", s, "C", "q") == 1.0
    with pytest.raises(KeyError, match="unknown scorer"):
        S.score("bleu", s, "C", "q")


def test_exact_match_and_token_f1_as_squad_normalises():
    from mllmcl.evaluation.scorers import exact_match, normalize_answer, token_f1, track_scores

    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert exact_match("the cat.", ["Cat"]) == 1.0 and exact_match("a cat sat", ["cat"]) == 0.0
    assert exact_match("Yes", ["no", "yes"]) == 1.0  # any acceptable answer
    # "a red car parked" vs "red car": common 2, precision 2/3 (a is dropped), recall 2/2 -> F1 0.8
    assert token_f1("a red car parked", ["red car"]) == pytest.approx(0.8)
    assert token_f1("blue", ["red car"]) == 0.0 and token_f1("", [""]) == 1.0
    assert token_f1("car red", ["x", "red car"]) == 1.0  # a bag of tokens, the best answer
    s = Sample(uid="u", task="RS", split="test", image="/i.png", image_rel="i.png", question="q?", answer="farmland")
    scores = track_scores("rs_ad", s, "The answer is farmland.", "q?")
    assert scores["native"] == 1.0 and scores["exact"] == 0.0 and 0 < scores["f1"] < 1  # the drift EM shows
