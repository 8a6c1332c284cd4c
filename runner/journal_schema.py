"""The journal's schema: its tables, its version, the upgrade of an older journal, and the
check a journal file passes before it is trusted (:func:`verify`).

The journal is the run's memory of which items are done. A journal that is cut short, was
overwritten, belongs to another program or to a newer runner must never be read as "nothing
is done" (a silent redo of everything) nor end in SQLite's traceback. :func:`verify` says,
in one line naming the file, what is wrong and what to do:

* 0 bytes, or not an SQLite file (its 16-byte header);
* damaged: ``PRAGMA quick_check`` finds something, or SQLite cannot read it at all;
* not a runner journal: no ``items``/``meta`` tables, or ``items`` lacks a column every
  runner journal has;
* written by a newer runner: ``meta.schema_version`` above :data:`SCHEMA_VERSION`.

Journals written before the version was recorded are version 1 and are upgraded on open
(the identity columns, runner/journal.py); :class:`runner.journal.Journal` records
:data:`SCHEMA_VERSION`. The check opens the file read-only: a refused journal is left
exactly as it was found (no -wal/-shm files are made beside it).
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from runner.errors import ConfigError, one_line

#: 1: journals before the version was recorded; 2: + name, name_key, fingerprint, src,
#: placed, warning, output_key (added on open to a version-1 journal); 3: + reused_from
SCHEMA_VERSION = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    slot INTEGER, device TEXT, model TEXT, batch_size INTEGER,
    started REAL, finished REAL, output TEXT, error TEXT,
    seq INTEGER NOT NULL, cost REAL NOT NULL DEFAULT 0, payload TEXT,
    planned_slot INTEGER, gen INTEGER NOT NULL DEFAULT 0,
    name TEXT, name_key TEXT, fingerprint TEXT, src TEXT, placed TEXT, warning TEXT
);
CREATE INDEX IF NOT EXISTS items_todo ON items (gen, status, planned_slot, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# journals written before these columns existed (versions 1, 2) get them on open
_ADDED_COLUMNS = ("name", "name_key", "fingerprint", "src", "placed", "warning", "output_key",
                  "reused_from")
_NAME_INDEX = ("CREATE UNIQUE INDEX IF NOT EXISTS items_name ON items (name_key);"
               "CREATE UNIQUE INDEX IF NOT EXISTS items_output ON items (output_key)")


def create(db: sqlite3.Connection) -> None:
    """Make the tables and indexes a journal needs; bring a version-1 journal's up to date."""
    db.executescript(_SCHEMA)
    have = {r[1] for r in db.execute("PRAGMA table_info(items)")}
    for column in _ADDED_COLUMNS:
        if column not in have:
            db.execute(f"ALTER TABLE items ADD COLUMN {column} TEXT")
    db.executescript(_NAME_INDEX)


_HEADER = b"SQLite format 3\x00"
# columns every runner journal has had since the first one
_CORE_COLUMNS = frozenset({"id", "status", "attempts", "slot", "device", "model", "batch_size",
                           "started", "finished", "output", "error", "seq", "cost", "payload",
                           "planned_slot", "gen"})


def _refuse(path: Path, what: str) -> ConfigError:
    return ConfigError(
        f"journal {path} {what}: it cannot say which items are done, so it is not used. "
        f"Move it aside (mv {path} {path}.broken) and start a new run without resume= "
        f"(this run's outputs stay where they are), or put back a good copy")


def verify(path: Path | str) -> None:
    """Raise ConfigError when the journal at ``path`` cannot be trusted; a missing file is a
    new journal and passes."""
    path = Path(path)
    try:
        if not path.exists():
            return
        if not path.is_file():
            raise _refuse(path, "is not a file")
        with open(path, "rb") as fh:
            head = fh.read(len(_HEADER))
    except OSError as exc:
        raise ConfigError(f"journal {path}: cannot read it ({exc.strerror}); check its "
                          f"permissions") from None
    if not head:
        raise _refuse(path, "is empty (0 bytes; cut short)")
    if head != _HEADER:
        raise _refuse(path, "is not an SQLite database (its header is not SQLite's)")
    # No -wal beside it: open it as immutable, which makes no -wal/-shm files either. With
    # a -wal (a controller was killed), read-only: what the -wal holds is part of the journal.
    wal = Path(f"{path}-wal").exists()
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro{'' if wal else '&immutable=1'}",
                             uri=True)
    except sqlite3.Error as exc:
        raise _refuse(path, f"cannot be opened ({one_line(exc)})") from None
    try:
        problems = [r[0] for r in db.execute("PRAGMA quick_check(3)")]
        if problems != ["ok"]:
            raise _refuse(path, f"is damaged (quick_check: {one_line('; '.join(problems), 160)})")
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"items", "meta"} <= tables:
            raise _refuse(path, "is not a runner journal (it has no items and meta tables)")
        columns = {r[1] for r in db.execute("PRAGMA table_info(items)")}
        missing = sorted(_CORE_COLUMNS - columns)
        if missing:
            raise _refuse(path, f"is not a runner journal (items lacks {', '.join(missing)})")
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        version = int(json.loads(row[0])) if row else 1
    except sqlite3.DatabaseError as exc:
        raise _refuse(path, f"is damaged ({one_line(exc, 160)})") from None
    except (ValueError, TypeError):
        raise _refuse(path, "has a schema_version that is not a number") from None
    finally:
        db.close()
    if version > SCHEMA_VERSION:
        raise ConfigError(f"journal {path} was written by a newer runner (journal schema "
                          f"{version}; this runner reads up to {SCHEMA_VERSION}): resume it "
                          f"with that runner, or start a new run")
