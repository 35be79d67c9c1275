"""Assignment: each pair goes to at most k annotators, nobody sees a pair twice, and every
label is stored exactly once, also with many annotators at the same time."""

import threading
from collections import Counter
from datetime import timedelta

from sqlalchemy import select

from rlhf.annotate import store
from rlhf.annotate.candidates import PairSpec, pair_key


def add_pairs(engine, n: int) -> None:
    specs = [PairSpec(f"prompt {i}", f"left {i}", f"right {i}", pair_key(f"prompt {i}", f"left {i}", f"right {i}"))
             for i in range(n)]
    store.import_pairs(engine, specs, source="test")


def add_users(engine, n: int) -> list[int]:
    return [store.user_by_token(engine, store.add_user(engine, f"user{i}")).id for i in range(n)]


def label_everything(engine, user_id: int, k: int, seen: list) -> None:
    while (row := store.current_or_next(engine, user_id, k)) is not None:
        seen.append((row.pair_id, user_id))
        assert store.record_label(engine, user_id, row.id, "tie", None) == "recorded"


def assignment_rows(engine) -> list:
    with engine.connect() as conn:
        return list(conn.execute(select(store.assignments)))


def test_each_pair_goes_to_k_people_and_nobody_twice(engine):
    add_pairs(engine, 10)
    seen: list = []
    for user_id in add_users(engine, 4):
        label_everything(engine, user_id, k=2, seen=seen)
    per_pair = Counter(pair for pair, _ in seen)
    assert len(per_pair) == 10 and set(per_pair.values()) == {2}
    assert len(set(seen)) == len(seen) == 20
    assert all(row.choice == "tie" for row in assignment_rows(engine))


def test_concurrent_annotators_never_exceed_k(engine):
    add_pairs(engine, 24)
    users = add_users(engine, 8)
    seen: list = []
    errors: list = []

    def work(user_id: int) -> None:
        try:
            label_everything(engine, user_id, k=3, seen=seen)
        except Exception as error:  # surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(user_id,)) for user_id in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    rows = assignment_rows(engine)
    assert Counter(row.pair_id for row in rows) == {pair: 3 for pair in Counter(r.pair_id for r in rows)}
    assert len(rows) == 72 and len({(r.pair_id, r.user_id) for r in rows}) == 72
    assert sorted(seen) == sorted((r.pair_id, r.user_id) for r in rows)


def test_open_pair_is_stable_until_labelled(engine):
    add_pairs(engine, 3)
    (user,) = add_users(engine, 1)
    first = store.current_or_next(engine, user, k=1)
    again = store.current_or_next(engine, user, k=1)
    assert (again.id, again.a_on_left) == (first.id, first.a_on_left)
    assert store.user_progress(engine, user, k=1) == store.Progress(done=0, total=3)
    assert store.record_label(engine, user, first.id, "left", "fine") == "recorded"
    assert store.record_label(engine, user, first.id, "right", None) == "duplicate"
    assert store.user_progress(engine, user, k=1) == store.Progress(done=1, total=3)
    (row,) = [r for r in assignment_rows(engine) if r.id == first.id]
    assert (row.choice, row.comment) == ("a" if first.a_on_left else "b", "fine")


def test_someone_elses_assignment_is_forbidden(engine):
    add_pairs(engine, 1)
    owner, other = add_users(engine, 2)
    row = store.current_or_next(engine, owner, k=2)
    assert store.record_label(engine, other, row.id, "left", None) == "forbidden"
    assert store.record_label(engine, other, 999_999, "left", None) == "gone"
    assert all(r.choice is None for r in assignment_rows(engine))


def test_display_order_is_randomised_and_recorded(engine):
    add_pairs(engine, 40)
    (user,) = add_users(engine, 1)
    label_everything(engine, user, k=1, seen=[])
    orders = Counter(row.a_on_left for row in assignment_rows(engine))
    assert orders[True] > 0 and orders[False] > 0  # all-equal has probability 2**-39


def test_stale_assignment_is_reclaimed_for_someone_else(engine):
    add_pairs(engine, 1)
    walker, other = add_users(engine, 2)
    abandoned = store.current_or_next(engine, walker, k=1)
    assert store.current_or_next(engine, other, k=1) is None  # the only place is taken
    assert store.reclaim_stale(engine, timedelta(hours=1)) == 0  # not stale yet
    with engine.begin() as conn:
        conn.execute(store.assignments.update().values(assigned_at=store.now() - timedelta(hours=2)))
    assert store.reclaim_stale(engine, timedelta(hours=1)) == 1
    taken = store.current_or_next(engine, other, k=1)
    assert taken is not None and taken.pair_id == abandoned.pair_id
    assert store.record_label(engine, walker, abandoned.id, "left", None) == "gone"
    assert store.record_label(engine, other, taken.id, "left", None) == "recorded"
