"""Response display segments, agreement statistics and position bias (pure functions)."""

from collections import Counter
from datetime import datetime

import pytest

from rlhf.annotate.render import segments
from rlhf.annotate.stats import (
    agreement_with_majority,
    fleiss_kappa,
    pair_kappa,
    position_bias,
    unique_mode,
)
from rlhf.annotate.store import LabelRow, choice_from_position

WHEN = datetime(2025, 1, 1)


def label(pair_id, user, choice, a_on_left=True):
    return LabelRow(pair_id, user, choice, a_on_left, None, WHEN)


def test_fenced_code_is_split_from_prose_and_html_stays_text():
    text = "Intro <b>bold</b>\n\n```python\nif x < 3:\n    print(x)\n```\nAfter.\n~~~\nunclosed"
    parts = segments(text)
    assert [(p.kind, p.language) for p in parts] == [
        ("text", ""), ("code", "python"), ("text", ""), ("code", "")
    ]
    assert parts[0].text == "Intro <b>bold</b>"  # kept verbatim; the template escapes it
    assert parts[1].text == "if x < 3:\n    print(x)"
    assert parts[3].text == "unclosed"


def test_plain_text_is_one_segment():
    assert [(p.kind, p.text) for p in segments("one\ntwo")] == [("text", "one\ntwo")]


def test_fleiss_kappa_matches_the_published_example():
    # Fleiss (1971) as worked on Wikipedia: 10 items, 14 raters, 5 categories, kappa = 0.210.
    table = [
        [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
    ]
    assert fleiss_kappa(table) == pytest.approx(0.2099, abs=5e-4)


def test_fleiss_kappa_edge_cases():
    assert fleiss_kappa([[2, 0], [0, 2]]) == pytest.approx(1.0)
    assert fleiss_kappa([[1, 1], [1, 1]]) == pytest.approx(-1.0)
    assert fleiss_kappa([[1, 0], [0, 1]]) is None  # nobody rated an item twice
    assert fleiss_kappa([[3, 0], [2, 0]]) is None  # one category only: chance agreement is 1


def test_pair_kappa_uses_pairs_with_two_or_more_labels():
    rows = [label(1, "ann", "a"), label(1, "bob", "a"), label(2, "ann", "b"), label(2, "bob", "b"),
            label(3, "ann", "tie")]
    assert pair_kappa(rows) == pytest.approx(1.0)


def test_unique_mode():
    assert unique_mode(Counter({"a": 2, "b": 1})) == "a"
    assert unique_mode(Counter({"a": 1, "b": 1})) is None
    assert unique_mode(Counter()) is None


def test_agreement_with_majority_leaves_the_person_out():
    rows = [
        label(1, "ann", "a"), label(1, "bob", "a"), label(1, "cat", "a"), label(1, "dan", "b"),
        label(2, "ann", "tie"), label(2, "bob", "b"), label(2, "cat", "b"),
    ]
    rates = agreement_with_majority(rows)
    # Pair 1: ann, bob and cat each see a majority "a" among the others (agree); dan's others
    # all say "a" (disagree). Pair 2: ann's others say "b" (disagree); bob's and cat's others
    # are split tie/b, so no majority and not counted.
    assert {user: (rate.hits, rate.total) for user, rate in rates.items()} == {
        "ann": (1, 2), "bob": (1, 1), "cat": (1, 1), "dan": (0, 1)
    }
    assert rates["ann"].share == 0.5


def test_position_bias_counts_left_wins_among_decisive_labels():
    rows = [
        label(1, "ann", "a", a_on_left=True),   # left won
        label(2, "ann", "b", a_on_left=False),  # b was on the left: left won
        label(3, "ann", "a", a_on_left=False),  # right won
        label(4, "ann", "tie"),                 # not decisive
    ]
    bias = position_bias(rows)
    assert (bias.hits, bias.total) == (2, 3)
    assert bias.share == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("position", "a_on_left", "stored"),
    [("left", True, "a"), ("left", False, "b"), ("right", True, "b"), ("right", False, "a"),
     ("tie", False, "tie"), ("both_bad", True, "both_bad")],
)
def test_clicked_side_maps_to_the_stored_response(position, a_on_left, stored):
    assert choice_from_position(position, a_on_left) == stored


def test_unknown_click_is_refused():
    with pytest.raises(ValueError):
        choice_from_position("middle", True)
