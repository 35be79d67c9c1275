"""Agreement and bias numbers for the admin page, and the majority vote that export uses.

Pure functions over plain data, so they are easy to check against published examples.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

from rlhf.annotate.store import CHOICES, LabelRow


def fleiss_kappa(items: Sequence[Sequence[int]]) -> float | None:
    """Fleiss' kappa for items rated by possibly different numbers of raters.

    `items[i][j]` is how many raters put item i in category j. Items with fewer than two raters
    carry no agreement information and are skipped. Returns None when it is undefined: no item
    with two raters, or every rating in one category (chance agreement is then 1).
    """
    rated = [row for row in items if sum(row) >= 2]
    if not rated:
        return None
    per_item = [sum(c * (c - 1) for c in row) / (sum(row) * (sum(row) - 1)) for row in rated]
    observed = sum(per_item) / len(per_item)
    total = sum(sum(row) for row in rated)
    shares = [sum(row[j] for row in rated) / total for j in range(len(rated[0]))]
    expected = sum(p * p for p in shares)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1.0 - expected)


def unique_mode(votes: Counter) -> str | None:
    """The single most common vote, or None when the top count is shared (no majority)."""
    ranked = votes.most_common(2)
    if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0][0]


def votes_by_pair(rows: Iterable[LabelRow]) -> dict[int, Counter]:
    by_pair: dict[int, Counter] = defaultdict(Counter)
    for row in rows:
        by_pair[row.pair_id][row.choice] += 1
    return by_pair


@dataclass(frozen=True)
class Rate:
    hits: int
    total: int

    @property
    def share(self) -> float | None:
        return self.hits / self.total if self.total else None


def agreement_with_majority(rows: Sequence[LabelRow]) -> dict[str, Rate]:
    """Per person: how often their label equals the majority of the *other* people on the same
    pair (leaving them out, so a person does not vote for themselves). Pairs where the others
    have no unique majority are not counted."""
    by_pair: dict[int, list[LabelRow]] = defaultdict(list)
    for row in rows:
        by_pair[row.pair_id].append(row)
    hits: Counter = Counter()
    totals: Counter = Counter()
    for pair_rows in by_pair.values():
        for row in pair_rows:
            others = Counter(other.choice for other in pair_rows if other is not row)
            majority = unique_mode(others)
            if majority is None:
                continue
            totals[row.user] += 1
            hits[row.user] += majority == row.choice
    return {user: Rate(hits[user], totals[user]) for user in totals}


def left_won(row: LabelRow) -> bool | None:
    """True if the response shown on the left was preferred, None for tie / both bad."""
    if row.choice == "a":
        return row.a_on_left
    if row.choice == "b":
        return not row.a_on_left
    return None


def position_bias(rows: Iterable[LabelRow]) -> Rate:
    """How often the left response wins among decisive labels; 50% means no position bias."""
    outcomes = [won for won in map(left_won, rows) if won is not None]
    return Rate(sum(outcomes), len(outcomes))


def pair_kappa(rows: Sequence[LabelRow]) -> float | None:
    """Fleiss' kappa over the four answers, across all pairs with two or more labels."""
    items = [[votes[c] for c in CHOICES] for votes in votes_by_pair(rows).values()]
    return fleiss_kappa(items)
