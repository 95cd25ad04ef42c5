"""The ratings store (srcore/rating/store.py) on a real SQLite file: one transaction per score,
upsert on resubmission, refusals that change nothing, tokens kept only as hashes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from srcore.rating.store import Key, MethodChanged, Refused, Store

KEY = Key("te", "img00", "bicubic")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "ratings" / "ratings.sqlite")


def _rows(store: Store) -> list[tuple[object, ...]]:
    with sqlite3.connect(store.path) as db:
        return db.execute("SELECT * FROM ratings ORDER BY rater_id").fetchall()


def _ready(store: Store, name: str) -> tuple[str, str]:
    token = store.add_rater(name)
    rater = store.rater(token)
    assert rater is not None and not rater.calibrated
    store.mark_calibrated(rater.rater_id)
    return token, rater.rater_id


def test_a_score_is_committed_and_a_resubmitted_one_replaces_it(store: Store) -> None:
    token, rater_id = _ready(store, "alice")
    first = store.new_display(rater_id, "rating", KEY)
    assert store.submit(token, first, 2) == KEY
    # A second showing of the same version (the "change my last score" page) replaces it.
    second = store.new_display(rater_id, "rating", KEY)
    store.submit(token, second, 4)
    rows = store.ratings()
    assert [(r["rater"], r["score"], r["revisions"]) for r in rows] == [("alice", 4, 1)]
    assert store.rated(rater_id) == {(KEY, 0)} and store.last_rated(rater_id) == (KEY, 0)
    # The retest showing (repeat 1) is a score of its own.
    store.submit(token, store.new_display(rater_id, "rating", KEY, repeat=1), 3)
    assert sorted((r["repeat"], r["score"]) for r in store.ratings()) == [(0, 4), (1, 3)]


@pytest.mark.parametrize("score", [0, 6, -1, "3", 2.5, 3.0, True, None, [3]])
def test_a_score_outside_1_to_5_or_not_an_integer_is_refused(store: Store, score: object) -> None:
    token, rater_id = _ready(store, "alice")
    display = store.new_display(rater_id, "rating", KEY)
    with pytest.raises(Refused) as err:
        store.submit(token, display, score)  # type: ignore[arg-type]
    assert err.value.status == 422 and "integer from 1 to 5" in str(err.value)
    assert _rows(store) == [] and not store.display(display).used  # type: ignore[union-attr]
    store.submit(token, display, 5)  # the display is still good for a valid score
    assert [r["score"] for r in store.ratings()] == [5]


def test_unknown_tokens_other_raters_unknown_ids_and_replays_change_nothing(
        store: Store) -> None:
    alice, alice_id = _ready(store, "alice")
    bob, bob_id = _ready(store, "bob")
    display = store.new_display(alice_id, "rating", KEY)
    calibration = store.new_display(alice_id, "calibration", Key("va", "img00", "hr"))
    cases = [("not-a-token", display, 403, "unknown rater token"),
             (bob, display, 403, "another rater"),
             (alice, "no-such-display", 404, "unknown image id"),
             (alice, calibration, 409, "calibration")]
    for token, shown, status, words in cases:
        with pytest.raises(Refused) as err:
            store.submit(token, shown, 3)
        assert err.value.status == status and words in str(err.value)
    assert _rows(store) == []
    store.submit(alice, display, 3)
    before = _rows(store)
    with pytest.raises(Refused) as err:  # the same request again: a replay
        store.submit(alice, display, 1)
    assert err.value.status == 409 and "replayed" in str(err.value)
    assert _rows(store) == before
    assert store.rated(bob_id) == set()


def test_tokens_are_kept_only_as_hashes_and_names_are_unique(store: Store) -> None:
    token = store.add_rater("alice")
    store.checkpoint()
    assert token.encode() not in store.path.read_bytes()
    assert store.rater(token).name == "alice"  # type: ignore[union-attr]
    assert store.rater(token + "x") is None
    with pytest.raises(ValueError, match="already has a link"):
        store.add_rater("alice")
    assert store.raters() == ["alice"]


def test_the_database_runs_in_wal_with_full_sync_and_checkpoints_into_one_file(
        store: Store) -> None:
    token, rater_id = _ready(store, "alice")
    store.submit(token, store.new_display(rater_id, "rating", KEY), 4)
    with store._connect() as db:  # what every connection of the store runs with
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.checkpoint()
    wal = store.path.with_name(store.path.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    copy = store.path.with_name("copy.sqlite")  # the main file alone holds the score
    copy.write_bytes(store.path.read_bytes())
    with sqlite3.connect(copy) as db:
        assert db.execute("SELECT score FROM ratings").fetchall() == [(4,)]


def test_a_method_rated_with_other_weights_is_refused(store: Store) -> None:
    store.record_method("srgan", "models/srgan.pt", "aaa", "srgan", "1")
    store.record_method("srgan", "models/srgan.pt", "bbb", "srgan", "2")  # nothing rated yet
    assert store.methods()["srgan"]["model_version"] == "2"
    token, rater_id = _ready(store, "alice")
    store.submit(token, store.new_display(rater_id, "rating", Key("te", "a", "srgan")), 3)
    with pytest.raises(MethodChanged, match="rated \\(1 scores\\) with other weights"):
        store.record_method("srgan", "models/srgan.pt", "ccc", "srgan", "3")
    store.record_method("srgan", "models/srgan.pt", "bbb", "srgan", "2")  # same: fine
