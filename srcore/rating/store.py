"""The ratings store: one SQLite file (ratings/ratings.sqlite) of raters, displays and scores.

Ratings are data people made, so the store is written for not losing them:

* WAL journal with synchronous=FULL: a score is on disk when its request is answered, and a
  `kill -9` of the server (or a power cut) loses at most the score being sent;
* one transaction per score (BEGIN IMMEDIATE ... COMMIT): the score and the spending of the
  display that carried it commit together or not at all;
* an upsert keyed by (rater, set, image, method, repeat): a resubmitted score replaces the
  earlier one (its `revisions` counts how often) instead of counting twice;
* every display (an image shown to a rater) has a random id, the only id a browser sees, and
  can carry one score: a replayed request finds it spent and changes nothing.

Tokens are stored as their sha256 only; the link a rater holds is the token itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

SCHEMA = """
CREATE TABLE IF NOT EXISTS raters (
    rater_id      TEXT PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    token_sha256  TEXT NOT NULL UNIQUE,
    created_at    TEXT NOT NULL,
    calibrated_at TEXT
);
CREATE TABLE IF NOT EXISTS methods (
    method         TEXT PRIMARY KEY,
    source         TEXT NOT NULL,
    weights_sha256 TEXT,
    model_name     TEXT,
    model_version  TEXT,
    recorded_at    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS displays (
    display_id TEXT PRIMARY KEY,
    rater_id   TEXT NOT NULL REFERENCES raters(rater_id),
    kind       TEXT NOT NULL CHECK (kind IN ('calibration', 'rating')),
    set_name   TEXT NOT NULL,
    image      TEXT NOT NULL,
    method     TEXT NOT NULL,
    repeat     INTEGER NOT NULL,
    shown_at   TEXT NOT NULL,
    used_at    TEXT
);
CREATE TABLE IF NOT EXISTS ratings (
    rater_id   TEXT NOT NULL REFERENCES raters(rater_id),
    set_name   TEXT NOT NULL,
    image      TEXT NOT NULL,
    method     TEXT NOT NULL,
    repeat     INTEGER NOT NULL,
    score      INTEGER NOT NULL CHECK (score BETWEEN 1 AND 5),
    display_id TEXT NOT NULL,
    rated_at   TEXT NOT NULL,
    revisions  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (rater_id, set_name, image, method, repeat)
);
"""

#: The scores a rater may give (the paper's 1 = bad ... 5 = excellent).
SCORES = range(1, 6)


class Key(NamedTuple):
    """One version of one image: what a score is about."""

    set_name: str
    image: str
    method: str


@dataclass(frozen=True)
class Rater:
    rater_id: str
    name: str
    token_sha256: str
    calibrated: bool


@dataclass(frozen=True)
class Display:
    display_id: str
    rater_id: str
    kind: str
    key: Key
    repeat: int
    used: bool


class Refused(Exception):
    """A score the store will not take; `status` is the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class MethodChanged(Exception):
    """A method name already rated with other weights: mixing them would make one MOS of
    two models."""


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A rater's secret: 32 random bytes, URL-safe."""
    return secrets.token_urlsafe(32)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class Store:
    """The SQLite file at `path`; a fresh connection per operation, so any thread may call."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(SCHEMA)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                             check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; any exception rolls the whole of it back."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # ------------------------------------------------------------------------------- raters

    def add_rater(self, name: str) -> str:
        """A new rater called `name`; returns their token (shown once: only its hash is kept)."""
        token = new_token()
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM raters WHERE name = ?", (name,)).fetchone():
                raise ValueError(f"rater '{name}' already has a link (they resume with it); "
                                 "choose another name")
            db.execute("INSERT INTO raters VALUES (?, ?, ?, ?, NULL)",
                       (secrets.token_hex(8), name, token_digest(token), _now()))
        return token

    def rater(self, token: str) -> Rater | None:
        """The rater holding `token`, or None for an unknown one."""
        with self._connect() as db:
            row = db.execute("SELECT rater_id, name, token_sha256, calibrated_at FROM raters "
                             "WHERE token_sha256 = ?", (token_digest(token),)).fetchone()
        return None if row is None else Rater(row[0], row[1], row[2], row[3] is not None)

    def raters(self) -> list[str]:
        with self._connect() as db:
            return [r[0] for r in db.execute("SELECT name FROM raters ORDER BY created_at")]

    def mark_calibrated(self, rater_id: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE raters SET calibrated_at = COALESCE(calibrated_at, ?) "
                       "WHERE rater_id = ?", (_now(), rater_id))

    # ------------------------------------------------------------------------------ methods

    def record_method(self, method: str, source: str, weights_sha256: str | None = None,
                      model_name: str | None = None, model_version: str | None = None) -> None:
        """What made `method`'s images. A method already rated with other weights is refused
        (MethodChanged): its ratings would silently pool two models."""
        with self._transaction() as db:
            row = db.execute("SELECT weights_sha256, source FROM methods WHERE method = ?",
                             (method,)).fetchone()
            if row is None:
                db.execute("INSERT INTO methods VALUES (?, ?, ?, ?, ?, ?)",
                           (method, source, weights_sha256, model_name, model_version, _now()))
                return
            if row[0] != weights_sha256:
                rated = db.execute("SELECT COUNT(*) FROM ratings WHERE method = ?",
                                   (method,)).fetchone()[0]
                if rated:
                    raise MethodChanged(
                        f"{self.path}: '{method}' was rated ({rated} scores) with other "
                        f"weights ({row[1]}); move {self.path.parent} aside to start a new "
                        "rating study, or rate this model with --model models:/NAME@ALIAS")
            db.execute("UPDATE methods SET source = ?, weights_sha256 = ?, model_name = ?, "
                       "model_version = ? WHERE method = ?",
                       (source, weights_sha256, model_name, model_version, method))

    def methods(self) -> dict[str, dict[str, str | None]]:
        """method -> {source, weights_sha256, model_name, model_version}."""
        with self._connect() as db:
            rows = db.execute("SELECT method, source, weights_sha256, model_name, model_version "
                              "FROM methods").fetchall()
        return {r[0]: {"source": r[1], "weights_sha256": r[2], "model_name": r[3],
                       "model_version": r[4]} for r in rows}

    # ----------------------------------------------------------------------------- displays

    def new_display(self, rater_id: str, kind: str, key: Key, repeat: int = 0) -> str:
        """Record that `key` is being shown to a rater; returns the display's random id."""
        display_id = secrets.token_urlsafe(18)
        with self._transaction() as db:
            db.execute("INSERT INTO displays VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                       (display_id, rater_id, kind, *key, repeat, _now()))
        return display_id

    def display(self, display_id: str) -> Display | None:
        with self._connect() as db:
            row = db.execute("SELECT display_id, rater_id, kind, set_name, image, method, "
                             "repeat, used_at FROM displays WHERE display_id = ?",
                             (display_id,)).fetchone()
        if row is None:
            return None
        return Display(row[0], row[1], row[2], Key(row[3], row[4], row[5]), row[6],
                       row[7] is not None)

    # ------------------------------------------------------------------------------ ratings

    def submit(self, token: str, display_id: str, score: int) -> Key:
        """Commit one score, or refuse it (Refused, with its HTTP status) changing nothing.

        The checks and the write are one IMMEDIATE transaction, so two copies of one request
        racing each other cannot both pass the "not yet spent" check.
        """
        if isinstance(score, bool) or not isinstance(score, int) or score not in SCORES:
            raise Refused(422, f"score must be an integer from 1 to 5, got {score!r}")
        with self._transaction() as db:
            rater = db.execute("SELECT rater_id FROM raters WHERE token_sha256 = ?",
                               (token_digest(token),)).fetchone()
            if rater is None:
                raise Refused(403, "unknown rater token; use the link you were given")
            row = db.execute("SELECT rater_id, kind, set_name, image, method, repeat, used_at "
                             "FROM displays WHERE display_id = ?", (display_id,)).fetchone()
            if row is None:
                raise Refused(404, "unknown image id")
            if row[0] != rater[0]:
                raise Refused(403, "this image was shown to another rater")
            if row[1] != "rating":
                raise Refused(409, "calibration images have fixed scores and are not rated")
            if row[6] is not None:
                raise Refused(409, "this display was already scored (a replayed request); "
                                   "reload the page")
            now = _now()
            db.execute(
                "INSERT INTO ratings VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0) "
                "ON CONFLICT (rater_id, set_name, image, method, repeat) DO UPDATE SET "
                "score = excluded.score, display_id = excluded.display_id, "
                "rated_at = excluded.rated_at, revisions = revisions + 1",
                (rater[0], row[2], row[3], row[4], row[5], score, display_id, now))
            db.execute("UPDATE displays SET used_at = ? WHERE display_id = ?", (now, display_id))
        return Key(row[2], row[3], row[4])

    def rated(self, rater_id: str) -> set[tuple[Key, int]]:
        """(key, repeat) of everything this rater has scored."""
        with self._connect() as db:
            rows = db.execute("SELECT set_name, image, method, repeat FROM ratings "
                              "WHERE rater_id = ?", (rater_id,)).fetchall()
        return {(Key(r[0], r[1], r[2]), r[3]) for r in rows}

    def last_rated(self, rater_id: str) -> tuple[Key, int] | None:
        """The (key, repeat) this rater scored most recently, for "change my last score"."""
        with self._connect() as db:
            row = db.execute("SELECT set_name, image, method, repeat FROM ratings "
                             "WHERE rater_id = ? ORDER BY rated_at DESC LIMIT 1",
                             (rater_id,)).fetchone()
        return None if row is None else (Key(row[0], row[1], row[2]), row[3])

    def ratings(self) -> list[dict[str, object]]:
        """Every score: rater (name), set, image, method, repeat, score, revisions."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT r.name, s.set_name, s.image, s.method, s.repeat, s.score, s.revisions "
                "FROM ratings s JOIN raters r USING (rater_id) "
                "ORDER BY r.name, s.set_name, s.image, s.method, s.repeat").fetchall()
        keys = ("rater", "set", "image", "method", "repeat", "score", "revisions")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def checkpoint(self) -> None:
        """Fold the WAL into the database file and truncate it, so that ratings.sqlite alone
        holds every score (what `dvc add ratings` then versions)."""
        with self._connect() as db:
            busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            raise RuntimeError(f"{self.path}: the WAL could not be checkpointed (the database "
                               "is in use by another process); stop `srgan rate` first")
