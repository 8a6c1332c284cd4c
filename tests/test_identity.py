"""Layer: unit (no processes).

Identity, unit level: names (runner.names), the journal's unique names, repeated ids and
changed inputs (runner.intake), embed's id and text rules. Real SQLite, no processes."""
from __future__ import annotations

import json
import os
import posixpath
import sqlite3
import unicodedata

import pytest
from hypothesis import given, settings, strategies as st

from runner import names
from runner.intake import InputRefused, take
from runner.journal import Journal
from runner.rundir import RunDir
from runner.tasks.base import BadItem, Item
from runner.tasks.embed import EmbedTask
from runner.tasks.subtitles import _names

ids = st.text(st.characters(codec=None, exclude_categories=()), max_size=300)
# what a journal row may hold: any text SQLite stores (no lone surrogates; discovery makes
# an input with them a bad item)
stored_ids = st.text(st.characters(codec="utf-8"), max_size=300)


def _safe_component(c: str, budget: int = names.NAME_BUDGET) -> None:
    assert c not in ("", ".", "..")
    assert "/" not in c and "\0" not in c
    assert not any(unicodedata.category(ch) == "Cc" for ch in c)
    assert len(c.encode("utf-8")) <= budget
    c.encode("utf-8")  # no lone surrogate left: the file system and SQLite take it


# ---- names -------------------------------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(st.lists(ids, min_size=2, max_size=8, unique=True))
def test_distinct_ids_get_distinct_safe_components(many):
    comps = [names.component(i) for i in many]
    for c in comps:
        _safe_component(c)
        # room left for the journal's tag and a task's suffix under the 255-byte limit
        _safe_component(c + names.tag("x"), names.NAME_MAX - names.SUFFIX_RESERVE)
    assert len(set(comps)) == len(comps)


@settings(max_examples=300, deadline=None)
@given(ids)
def test_escape_keeps_what_a_name_may_hold_and_is_reversible(text):
    e = names.escape(text)
    if text in ("", ".", ".."):
        return  # %, %2E, %2E%2E (test_names_kept_as_written)
    kept = [ch for ch in text if ch not in "/%" and unicodedata.category(ch) != "Cc"
            and not 0xD800 <= ord(ch) <= 0xDFFF]
    assert all(ch in e for ch in kept)
    assert _unescape(e) == text


def _unescape(e: str) -> str:
    out, i, raw = [], 0, bytearray()
    while i < len(e):
        if e[i] == "%" and e[i + 1] == "u":
            out.append(raw.decode("utf-8", "surrogateescape"))
            raw.clear()
            out.append(chr(int(e[i + 2:i + 6], 16)))
            i += 6
        elif e[i] == "%":
            raw.append(int(e[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(raw.decode("utf-8", "surrogateescape"))
            raw.clear()
            out.append(e[i])
            i += 1
    out.append(raw.decode("utf-8", "surrogateescape"))
    return "".join(out)


@settings(max_examples=300, deadline=None)
@given(st.lists(ids, min_size=1, max_size=5))
def test_relative_paths_stay_inside_their_base(parts):
    rel = names.relative(parts)
    assert not rel.startswith("/")
    joined = posixpath.normpath(posixpath.join("/base", rel))
    assert joined.startswith("/base/") and len(rel.split("/")) == len(parts)


def test_names_kept_as_written():
    for text in ("東京", "Ça va", "Ça_va", "good one", "it's [1] #2 & more 🎧", "Привет мир",
                 "مرحبا", "a\\b", "~x"):
        assert names.component(text) == text
    assert names.component("a/b") == "a%2Fb" and names.component("a_b") == "a_b"
    assert names.component("a\nb") == "a%0Ab" and names.component("100%") == "100%25"
    assert (names.component("."), names.component(".."), names.component("")) == \
        ("%2E", "%2E%2E", "%")
    long_a, long_b = "x" * 300 + "a", "x" * 300 + "b"
    ca, cb = names.component(long_a), names.component(long_b)
    assert ca != cb and len(ca.encode()) <= names.NAME_BUDGET and ca.startswith("x" * 100)
    assert names.component(long_a) == ca  # stable across runs


def test_error_files_are_distinct_for_ids_that_used_to_meet(tmp_path):
    rd = RunDir(tmp_path)
    meet = ["a/b", "a_b", "a\nb", ".", "..", "x" * 400 + "1", "x" * 400 + "2", "a%2Fb"]
    files = {rd.error_file(names.component(i)) for i in meet}
    assert len(files) == len(meet)
    assert all(f.parent == tmp_path / "logs" / "errors" for f in files)


# ---- the journal: names unique under folding, refused twice -------------------------------

def _journal(tmp_path, name="j.sqlite") -> Journal:
    return Journal(tmp_path / name)


def test_names_that_meet_on_a_folding_file_system_are_told_apart(tmp_path):
    j = _journal(tmp_path)
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    found = take(j, [Item(i, 1.0, "t") for i in ("Straße", "STRASSE", nfc, nfd, "Talk", "talk")])
    rows = dict(j._db.execute("SELECT id, name FROM items"))
    assert rows["Straße"] == "Straße" and rows[nfc] == nfc and rows["Talk"] == "Talk"
    assert rows["STRASSE"] == "STRASSE" + names.tag("STRASSE")
    assert rows[nfd] == nfd + names.tag(nfd) and rows["talk"] == "talk" + names.tag("talk")
    assert len({names.fold(n) for n in rows.values()}) == 6 and found.renamed_count == 3
    j.commit()
    # deterministic, and kept for good: a second invocation keeps every name
    j2 = _journal(tmp_path)
    take(j2, [Item(i, 1.0, "t") for i in ("talk", "Talk", "STRASSE", "Straße", nfd, nfc)])
    assert dict(j2._db.execute("SELECT id, name FROM items")) == rows


def test_the_journal_refuses_one_name_for_two_items(tmp_path):
    j = _journal(tmp_path)
    take(j, [Item("a", 1.0, "t", name="same"), Item("b", 1.0, "t", name="other")])
    with pytest.raises(sqlite3.IntegrityError):
        j._db.execute("UPDATE items SET name='SAME', name_key=? WHERE id='b'",
                      (names.fold("SAME"),))


@settings(max_examples=60, deadline=None)
@given(st.lists(stored_ids, min_size=1, max_size=12, unique=True))
def test_any_ids_get_names_distinct_under_folding(many):
    j = Journal(None)
    take(j, [Item(i, 1.0, "t") for i in many])
    got = [r[0] for r in j._db.execute("SELECT name FROM items")]
    assert len(got) == len(many) and len({names.fold(n) for n in got}) == len(many)
    for n in got:
        _safe_component(n, names.NAME_MAX - names.SUFFIX_RESERVE)


# ---- repeated ids --------------------------------------------------------------------------

def _items(pairs):
    return [Item(i, 1.0, t, fingerprint=names.text_fingerprint(t), where=f"c.jsonl line {n}")
            for n, (i, t) in enumerate(pairs, start=1)]


def test_a_repeated_id_refuses_the_run_naming_both_lines_and_writes_nothing(tmp_path):
    j = _journal(tmp_path)
    pairs = [("1", "one"), ("2", "two")] + [(f"x{k}", "t") for k in range(2500)] + [("1", "uno")]
    with pytest.raises(InputRefused) as err:
        take(j, _items(pairs))
    msg = str(err.value)
    assert "'1'" in msg and "line 1" in msg and "line 2503" in msg and "\n" not in msg
    assert "task.on_duplicate_id" in msg
    assert j.counts(this_gen_only=False) == {"pending": 0, "running": 0, "done": 0, "failed": 0}


def test_keep_first_and_suffix(tmp_path):
    pairs = [("1", "one"), ("1#2", "real"), ("1", "uno"), ("1", "eins")]
    j = _journal(tmp_path, "a.sqlite")
    found = take(j, _items(pairs), on_duplicate="keep_first")
    assert dict(j._db.execute("SELECT id, payload FROM items")) == {"1": "one", "1#2": "real"}
    assert found.repeated == 2 and "line 1 and c.jsonl line 3" in found.first_repeated
    j = _journal(tmp_path, "b.sqlite")
    take(j, _items(pairs), on_duplicate="suffix")
    assert dict(j._db.execute("SELECT id, payload FROM items")) == {
        "1": "one", "1#2": "real", "1#3": "uno", "1#4": "eins"}


# ---- changed inputs on resume ----------------------------------------------------------------

def _done_all(j: Journal) -> None:
    for (i,) in j._db.execute("SELECT id FROM items WHERE status='pending'").fetchall():
        j.mark_running(i, 0, "cpu:0", 1.0)
        j.mark_done(i, f"out/{i}", "m", 1, 1.0, 2.0)
    j.commit()
    j.close()


def test_a_changed_input_is_made_again_and_said(tmp_path):
    j = _journal(tmp_path)
    take(j, _items([("a", "alpha"), ("b", "beta"), ("c", "gamma")]))
    _done_all(j)
    j = _journal(tmp_path)
    found = take(j, _items([("a", "alpha"), ("b", "BETA edited"), ("c", "gamma")]))
    assert found.changed == 1 and found.first_changed == ["b"]
    rows = {r[0]: r[1:] for r in j._db.execute("SELECT id, status, attempts, output, payload "
                                                "FROM items")}
    assert rows["b"] == ("pending", 0, None, "BETA edited") and rows["a"][0] == "done"
    j.commit()
    j.close()


def test_on_changed_error_refuses_and_keeps_the_journal(tmp_path):
    j = _journal(tmp_path)
    take(j, _items([("a", "alpha"), ("b", "beta")]))
    _done_all(j)
    j = _journal(tmp_path)
    with pytest.raises(InputRefused) as err:
        take(j, _items([("a", "alpha"), ("b", "beta!")]), on_changed="error")
    assert "1 item(s) changed" in str(err.value) and "b" in str(err.value)
    assert dict(j._db.execute("SELECT id, status FROM items")) == {"a": "done", "b": "done"}


def test_a_bad_item_fixed_in_the_input_runs_and_a_good_one_gone_bad_fails(tmp_path):
    j = _journal(tmp_path)
    take(j, [BadItem("a", "item a: empty text", fingerprint=names.text_fingerprint("\0bad")),
             *_items([("b", "beta")])])
    _done_all(j)
    j = _journal(tmp_path)
    take(j, [*_items([("a", "alpha")]),
             BadItem("b", "item b: empty text", fingerprint=names.text_fingerprint("\0bad"))])
    assert dict(j._db.execute("SELECT id, status FROM items")) == {"a": "pending", "b": "failed"}


# ---- embed: ids and texts as the input spells them --------------------------------------------

def test_embed_ids_and_texts_that_are_not_what_they_should_be_are_bad_items(tmp_path):
    lines = [{"id": "a", "text": "fine"}, {"id": 7, "text": "int id"},
             {"id": None, "text": "null id"}, {"id": [1], "text": "list id"},
             {"id": True, "text": "bool id"}, {"id": {"k": 1}, "text": "object id"},
             {"id": 1.5, "text": "float id"}, {"text": "no id"}, {"id": "n", "text": 42},
             {"id": "o", "text": {"nested": "object"}}, {"id": "e", "text": "  "}]
    path = tmp_path / "c.jsonl"
    body = "\n".join(json.dumps(x) for x in lines) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n"
    path.write_text(body, encoding="utf-8")
    found = list(EmbedTask(input=str(path), id_field="id", cost="chars").discover())
    good = [o.id for o in found if isinstance(o, Item)]
    bad = [o for o in found if isinstance(o, BadItem)]
    assert good == ["a", "7"]
    assert len(bad) == 10 and all("\n" not in b.error and b.where for b in bad)
    by_line = {b.where: b.error for b in bad}
    assert "is null" in by_line["c.jsonl line 3"] and "a list" in by_line["c.jsonl line 4"]
    assert "a boolean" in by_line["c.jsonl line 5"] and "missing" in by_line["c.jsonl line 8"]
    assert "a number, not a string" in by_line["c.jsonl line 9"]
    assert "JSON object, not a string" in by_line["c.jsonl line 10"]
    assert "nested too deeply" in by_line["c.jsonl line 12"]
    assert len({b.id for b in bad} | set(good)) == 12  # placeholder ids meet no real one


def test_subtitle_names_one_stem_two_formats_and_folding():
    got = _names(["talk.wav", "talk.mp4", "Talk.mkv", "sub/a b.wav", "sub/東京.flac",
                  "x.tar.wav", "noext"])
    assert got["Talk.mkv"] == "Talk"  # video first, then extension: mkv < mp4
    assert got["talk.mp4"] == "talk.mp4" and got["talk.wav"] == "talk.wav"
    assert got["sub/a b.wav"] == "sub/a b" and got["sub/東京.flac"] == "sub/東京"
    assert got["x.tar.wav"] == "x.tar" and got["noext"] == "noext"


def test_umask_is_respected_by_atomic_writes(tmp_path):
    from runner.rundir import atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "new" / "f.txt", "x")
        Journal(tmp_path / "j.sqlite").close()
    finally:
        os.umask(old)
    assert (tmp_path / "new" / "f.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "j.sqlite").stat().st_mode & 0o777 == 0o640


def test_values_hydra_refuses_unquoted_are_quoted_for_it():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from runner.config import rewrite_argv

    parser = OverridesParser.create()
    for value in ("/archive/東京", "/a/Ça va.wav", "/a/b [1] #2 & 🎧", "/x/Москва/مرحبا"):
        (arg,) = rewrite_argv(["prog", f"task.input={value}"])[1:]
        assert parser.parse_override(arg).value() == value
    # left as typed: plain values, sweeps, lists, functions, values with quotes
    for arg in ("devices=cpu2", "batch_size=16,32", "x=[1,2]", "x=glob(*)", "a=it's", "-m"):
        assert rewrite_argv(["prog", arg])[1:] == [arg]


def test_the_journal_refuses_one_output_path_for_two_items(tmp_path):
    j = _journal(tmp_path)
    take(j, [Item(i, 1.0, "t") for i in ("a", "b", "c")])
    for i in ("a", "b", "c"):
        j.mark_running(i, 0, "cpu:0", 1.0)
    j.mark_done("a", "subtitles/x.en.srt", "m", 1, 1.0, 2.0)
    with pytest.raises(sqlite3.IntegrityError):  # also under folding, and in a batch
        j.mark_done_many([("c", "subtitles/c.en.srt", "m", 1, 1.0, 2.0),
                          ("b", "subtitles/X.en.srt", "m", 1, 1.0, 2.0)])
    assert dict(j._db.execute("SELECT id, status FROM items")) == {
        "a": "done", "b": "running", "c": "running"}  # nothing of the refused batch moved
    shared = Journal(tmp_path / "shared.sqlite", shared_outputs=True)  # embed's shards
    take(shared, [Item(i, 1.0, "t") for i in ("a", "b")])
    for i in ("a", "b"):
        shared.mark_running(i, 0, "cpu:0", 1.0)
    shared.mark_done_many([(i, "embeddings/part-00000.parquet", "m", 2, 1.0, 2.0) for i in "ab"])
