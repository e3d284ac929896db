"""notify_api.take_tokens_v1: up to p_wanted tokens from a shared bucket (rate per second, burst one second), through
the worker's own statement."""

from __future__ import annotations

from runner.drainer import TAKE_TOKENS


def take(db, key, rate, wanted):
    return db.execute(TAKE_TOKENS, {"key": key, "rate": rate, "wanted": wanted}).fetchone()[0]


def test_a_new_bucket_holds_one_second_of_tokens(db):
    assert take(db, "k", 10, 100) == 10
    assert take(db, "k", 10, 100) == 0


def test_never_more_than_wanted(db):
    assert take(db, "k", 10, 4) == 4
    assert take(db, "k", 10, 4) == 4
    assert take(db, "k", 10, 4) == 2


def test_buckets_are_separate_per_key(db):
    assert take(db, "a", 5, 5) == 5
    assert take(db, "b", 5, 5) == 5


def test_nothing_wanted_takes_nothing(db):
    assert take(db, "k", 3, 0) == 0
    assert take(db, "k", 3, 3) == 3
