"""IFEval-style verifiable instructions: each check on responses that do and do not follow it, and the four aggregate scores by hand."""

from __future__ import annotations

import pytest

from cl_runner.evaluation.instruction_following import CHECKS, check_item, follows, instruction_scores

CASES = [  # (instruction, kwargs, a response that follows it, one that does not)
    ("change_case:english_capital", {}, "THE SKY IS BLUE.", "The sky is BLUE."),
    ("change_case:english_lowercase", {}, "the sky is blue.", "the sky is Blue."),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, "one two three four five", "one two three four"),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "one two three four", "one two three four five"),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First part.\n***\nSecond part.", "First part.\n***\n***\nSecond part."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "Fruit:\n* apple\n- pear", "Fruit:\n* apple\n* pear\n* plum"),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', '{"a": [1, 2]'),
    ("detectable_format:title", {}, "<<Ode to tea>>\nWarm cup.", "<<>>\nWarm cup."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello.\nP.S. See you.", "Hello. See you."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Send to [name] at [address].", "Send to [name] at home."),
    ("keywords:existence", {"keywords": ["river", "Stone"]}, "A stone by the River.", "A stone by the lake."),
    ("keywords:forbidden_words", {"forbidden_words": ["cat"]}, "A catalogue of dogs.", "The Cat sat."),
    ("keywords:frequency", {"keyword": "tea", "frequency": 3, "relation": "at least"}, "Tea, tea and more TEA.", "Tea and tea."),
    ("startend:end_checker", {"end_phrase": "Is there anything else?"}, "Done. Is there anything else?  ", "Is there anything else? Done."),
    ("startend:quotation", {}, '"Wrapped in quotes."', '"Only opened.'),
    ("punctuation:no_comma", {}, "No commas here.", "One, two."),
]


@pytest.mark.parametrize("instruction,kwargs,good,bad", CASES)
def test_each_check_tells_a_following_response_from_one_that_does_not(instruction, kwargs, good, bad):
    assert follows(good, instruction, kwargs) == (True, True)
    assert follows(bad, instruction, kwargs)[0] is False


def test_every_registered_kind_is_exercised():
    assert {c[0] for c in CASES} == set(CHECKS) and len(CHECKS) >= 10


def test_loose_forgives_a_preamble_line_and_markdown_emphasis_but_strict_does_not():
    preamble = "Sure, here it is:\nTHE SKY IS BLUE."
    assert follows(preamble, "change_case:english_capital", {}) == (False, True)
    emphasised = "*No commas here.*"
    assert follows(emphasised, "startend:quotation", {}) == (False, False)  # removing * does not add quotes
    assert follows('**"Quoted."**', "startend:quotation", {}) == (False, True)
    assert follows("", "punctuation:no_comma", {}) == (False, False)  # an empty response follows nothing


def test_prompt_and_instruction_level_scores_by_hand():
    items = [
        {"instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"], "kwargs": [{}, {}]},
        {"instruction_id_list": ["change_case:english_capital"], "kwargs": [{}]},
        {"instruction_id_list": ["keywords:existence", "punctuation:no_comma", "startend:end_checker"],
         "kwargs": [{"keywords": ["moon"]}, {}, {"end_phrase": "the end"}]},
    ]
    responses = [
        "all lower, but a comma",  # no_comma fails, lowercase holds: 1 of 2
        "Intro:\nALL CAPS",  # strict fails, loose holds (first line removed)
        "the moon rose. the end",  # all three hold
    ]
    scores = instruction_scores(responses, items)
    assert scores["prompt_level_strict_acc"] == pytest.approx(1 / 3)  # only the third prompt
    assert scores["prompt_level_loose_acc"] == pytest.approx(2 / 3)  # the second too
    assert scores["inst_level_strict_acc"] == pytest.approx(4 / 6)  # lowercase + three of the third
    assert scores["inst_level_loose_acc"] == pytest.approx(5 / 6)
    assert scores["kind/punctuation:no_comma"] == pytest.approx(1 / 2)


@pytest.mark.parametrize("item,message", [
    ({"instruction_id_list": ["made_up:kind"], "kwargs": [{}]}, "unknown instruction"),
    ({"instruction_id_list": ["keywords:existence"], "kwargs": [{"keyword": ["x"]}]}, "unexpected keyword"),
    ({"instruction_id_list": ["punctuation:no_comma"], "kwargs": []}, "same, non-zero length"),
])
def test_a_bad_record_is_refused_with_one_clear_reason(item, message):
    with pytest.raises(ValueError, match=message):
        check_item(item, "data.jsonl line 1")
