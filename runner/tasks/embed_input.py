"""Embed's input readers: ``.txt``, ``.jsonl``, ``.csv`` and ``.parquet``, each with a bound
per item.

Every reader yields :class:`Row` s -- (number, id as read, text, error) -- in input order and
holds at most about ``bound`` bytes (``task.max_item_bytes``) plus a little of any one item:

* ``.txt`` / ``.jsonl``: a line is read with ``readline(bound + 2)``; a longer one is
  measured in 1 MiB chunks that are dropped as they are read, and becomes an error row naming
  its size. Its first 64 KiB are kept, so that a ``.jsonl`` line's id can still be read when
  the id field comes before the text (:func:`id_from_head`); otherwise the caller names the
  item by file and line.
* ``.csv``: records (a quoted field may hold newlines) are cut by :func:`read_records`, which
  follows the quoting itself, so an over-long record is skipped the same way;
  ``csv.field_size_limit`` is raised to the bound, so a big cell is this row's error, never
  the whole file's.
* ``.parquet``: pyarrow reads a row group's column whole, but a cell over the bound is never
  made a Python string: its byte length comes from arrow.

``bound=None`` (``task.max_item_bytes=null``): no limit, lines are read whole.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any, BinaryIO, Iterator, NamedTuple

from runner.tasks.base import ConfigError, too_big

CHUNK = 1 << 20  # an over-long line is read (and dropped) this much at a time
HEAD = 64 << 10  # what is kept of an over-long line: room for the fields before the text
SLACK = 64 << 10  # a csv row may exceed the bound by this much (its other cells)
MISSING = object()  # an id field absent from a line


class Row(NamedTuple):
    """One item as a reader found it."""

    n: int  # line (.txt/.jsonl) or row (.csv/.parquet) number, from 1
    ident: Any  # the id field's value (MISSING: absent); the line number for .txt
    text: Any  # the text field's value (None with an error)
    error: str | None  # why this item cannot be embedded, or None


class Line(NamedTuple):
    """A physical line (or csv record) as :func:`read_lines` / :func:`read_records` give it."""

    n: int
    data: bytes | None  # without its line ending; None when over the bound
    size: int  # bytes, line ending excluded
    head: bytes  # over the bound: its first HEAD bytes (else b"")


def _ending(last: bytes, prev_end: bytes) -> int:
    """How many bytes of line ending (``\\n`` or ``\\r\\n``) close a line whose last chunk
    is ``last`` and whose chunk before ended with ``prev_end``."""
    if not last.endswith(b"\n"):
        return 0
    if last.endswith(b"\r\n") or (len(last) == 1 and prev_end == b"\r"):
        return 2
    return 1


def read_lines(fh: BinaryIO, bound: int | None) -> Iterator[Line]:
    """The lines of ``fh``, never more than ``bound`` + 2 bytes of one held at a time."""
    cap = None if bound is None else bound + 2  # room for \r\n
    n = 0
    while True:
        raw = fh.readline() if cap is None else fh.readline(cap)
        if not raw:
            return
        n += 1
        if cap is None or raw.endswith(b"\n") or len(raw) < cap:
            data = raw.rstrip(b"\r\n")
            if bound is not None and len(data) > bound:
                yield Line(n, None, len(data), data[:HEAD])
            else:
                yield Line(n, data, len(data), b"")
            continue
        head, size, last, prev_end = raw[:HEAD], len(raw), raw, b""
        while not last.endswith(b"\n"):
            prev_end = last[-1:]
            last = fh.readline(CHUNK)
            if not last:
                break
            size += len(last)
        yield Line(n, None, size - _ending(last, prev_end), head)


# ---- csv: records cut by following the quoting (excel dialect) ------------------------------
_START, _UNQUOTED, _QUOTED, _QUOTE_IN_QUOTED = range(4)
_COMMA_OR_NL = re.compile(rb"[,\n]")


def _scan(buf: bytes, state: int) -> tuple[int, bool]:
    """Follow csv's quoting over ``buf`` (a physical line or a part of one, so a newline can
    only be its last byte); (state after it, whether the record ended with it)."""
    if b'"' not in buf and state in (_START, _UNQUOTED):  # the common case: no quoting
        if buf.endswith(b"\n"):
            return _START, True
        return (_START if buf.endswith(b",") else _UNQUOTED if buf else state), False
    i, n = 0, len(buf)
    while i < n:
        if state == _QUOTED:
            j = buf.find(b'"', i)
            if j < 0:
                return _QUOTED, False
            state, i = _QUOTE_IN_QUOTED, j + 1
            continue
        c = buf[i]
        if state == _UNQUOTED:
            m = _COMMA_OR_NL.search(buf, i)
            if m is None:
                return _UNQUOTED, False
            if buf[m.start()] == 0x0A:
                return _START, True
            state, i = _START, m.end()
        elif c == 0x0A:  # a newline at a field's start or after a closing quote
            return _START, True
        elif state == _START:
            state, i = (_QUOTED, i + 1) if c == 0x22 else (_START, i + 1) if c == 0x2C \
                else (_UNQUOTED, i)
        else:  # a quote in a quoted field: "" is a quote, "," ends the field, else literal
            state, i = (_QUOTED if c == 0x22 else _START if c == 0x2C else _UNQUOTED), i + 1
    return state, False


def read_records(fh: BinaryIO, bound: int | None) -> Iterator[Line]:
    """The csv records of ``fh`` (a quoted field may span lines), never more than
    ``bound`` + SLACK bytes of one held at a time."""
    cap = None if bound is None else bound + SLACK
    n = 0
    while True:
        parts: list[bytes] = []
        head, size, over, state, ended = b"", 0, False, _START, False
        last, prev_end = b"", b""
        while not ended:
            prev_end = last[-1:] or prev_end
            last = fh.readline(CHUNK)
            if not last:
                break
            size += len(last)
            state, ended = _scan(last, state)
            if over:
                continue
            parts.append(last)
            if cap is not None and size > cap:
                over, head, parts = True, b"".join(parts)[:HEAD], []
        if size == 0:
            return
        n += 1
        if over:
            yield Line(n, None, size - _ending(last, prev_end), head)
        else:
            yield Line(n, b"".join(parts), size, b"")


def _csv_fields(data: bytes) -> list[str]:
    """One record's fields (csv.Error for a malformed one)."""
    return next(csv.reader([data.decode("utf-8", errors="replace")]), [])


# ---- the readers ----------------------------------------------------------------------------
def _decode(data: bytes) -> tuple[str | None, str | None]:
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, f"undecodable line ({exc.reason} at byte {exc.start})"


def id_from_head(head: bytes, id_field: str) -> Any:
    """The id of a JSON line from its first bytes, when the id field comes before whatever
    runs past them (the giant text); MISSING otherwise. Keys are read one by one with the
    json module's own scanner, so a key spelled inside a string value never matches."""
    s = head.decode("utf-8", errors="replace")
    ws = re.compile(r"[ \t\n\r]*")
    decoder = json.JSONDecoder()
    i = ws.match(s).end()
    if s[i:i + 1] != "{":
        return MISSING
    i += 1
    while True:
        i = ws.match(s, i).end()
        if s[i:i + 1] != '"':
            return MISSING
        try:
            key, i = json.decoder.scanstring(s, i + 1)
            i = ws.match(s, i).end()
            if s[i:i + 1] != ":":
                return MISSING
            value, i = decoder.raw_decode(s, ws.match(s, i + 1).end())
        except (ValueError, RecursionError):  # the value runs past the head
            return MISSING
        if key == id_field:
            return value
        i = ws.match(s, i).end()
        if s[i:i + 1] != ",":
            return MISSING
        i += 1


def read_txt(path: Path, text_field: str, id_field: str | None,
             bound: int | None) -> Iterator[Row]:
    """One text per line; the id is the line number."""
    with open(path, "rb") as fh:
        for line in read_lines(fh, bound):
            if line.data is None:
                yield Row(line.n, line.n, None, too_big("the line", line.size, bound))
                continue
            text, error = _decode(line.data)
            yield Row(line.n, line.n, text, error)


def read_jsonl(path: Path, text_field: str, id_field: str | None,
               bound: int | None) -> Iterator[Row]:
    """One JSON object per line, with ``text_field`` (and ``id_field``)."""
    with open(path, "rb") as fh:
        for line in read_lines(fh, bound):
            n = line.n
            if line.data is None:
                ident = id_from_head(line.head, id_field) if id_field else None
                yield Row(n, ident, None, too_big("the line", line.size, bound))
                continue
            text, error = _decode(line.data)
            if error or not text.strip():
                yield Row(n, None, None, error or "empty line")
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                yield Row(n, None, None, f"bad JSON ({exc.msg} at column {exc.colno})")
                continue
            except RecursionError:
                yield Row(n, None, None, "JSON nested too deeply to read")
                continue
            del text
            if not isinstance(obj, dict) or text_field not in obj:
                yield Row(n, None, None, f"no field {text_field!r} (set task.text_field)")
                continue
            yield Row(n, obj.get(id_field, MISSING) if id_field else None, obj[text_field], None)


def _over(value: Any, bound: int | None) -> int:
    """``value``'s UTF-8 size when it is a string over ``bound``, else 0."""
    if bound is None or not isinstance(value, str) or len(value) * 4 <= bound:
        return 0
    size = len(value) if len(value) > bound else len(value.encode("utf-8", "surrogatepass"))
    return size if size > bound else 0


def read_csv(path: Path, text_field: str, id_field: str | None,
             bound: int | None) -> Iterator[Row]:
    """A header row naming the columns, then one item per row (blank rows skipped)."""
    limit = 2**31 - 1 if bound is None else bound + SLACK
    csv.field_size_limit(max(csv.field_size_limit(), limit))  # a big cell: this row's error
    with open(path, "rb") as fh:
        records = read_records(fh, bound)
        header: list[str] | None = None
        for rec in records:
            if rec.data is None:
                raise ConfigError(f"{path}: the header row is {rec.size:,} bytes; is this a "
                                  f"csv file? (task.max_item_bytes={bound:,})")
            try:
                header = _csv_fields(rec.data)
            except csv.Error as exc:
                raise ConfigError(f"{path}: unreadable header row ({exc})") from None
            if header:
                break
        if not header:
            return
        col_text = header.index(text_field) if text_field in header else None
        col_id = header.index(id_field) if id_field and id_field in header else None
        n = 0
        for rec in records:
            if rec.data is None:
                n += 1
                ident = MISSING
                if col_id is not None:
                    try:
                        got = _csv_fields(rec.head)
                    except csv.Error:
                        got = []
                    ident = got[col_id] if col_id < len(got) - 1 else MISSING
                yield Row(n, ident if id_field else None, None,
                          too_big("the row", rec.size, bound))
                continue
            try:
                values = _csv_fields(rec.data)
            except csv.Error as exc:
                n += 1
                yield Row(n, None, None, f"bad CSV row ({exc})")
                continue
            if not values:
                continue
            n += 1
            row = dict(zip(header, values))
            if col_text is None:
                yield Row(n, None, None, f"no column {text_field!r} (set task.text_field)")
                continue
            value = row.get(text_field)
            ident = row.get(id_field, MISSING if col_id is None else None) if id_field else None
            if (size := _over(value, bound)):
                yield Row(n, ident, None, too_big("the text cell", size, bound))
                continue
            error = "undecodable text" if value and "\ufffd" in value else None
            yield Row(n, ident, value, error)


def read_parquet(path: Path, text_field: str, id_field: str | None,
                 bound: int | None) -> Iterator[Row]:
    """Columns ``text_field`` (and ``id_field``), one item per row."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise ConfigError(f"{path}: no column {text_field!r} (set task.text_field)")
    if id_field and id_field not in pf.schema_arrow.names:
        raise ConfigError(f"{path}: no column {id_field!r} (set task.id_field, or null for "
                          f"row numbers)")
    cols = [text_field] + ([id_field] if id_field and id_field != text_field else [])
    n = 0
    for batch in pf.iter_batches(columns=cols, batch_size=1024):
        col = batch.column(batch.schema.get_field_index(text_field))
        sizes = None
        if bound is not None and (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
                                  or pa.types.is_binary(col.type)
                                  or pa.types.is_large_binary(col.type)):
            lengths = pc.binary_length(col)
            over = pc.fill_null(pc.greater(lengths, bound), False)
            if pc.any(over).as_py():  # never made Python strings: nulls in their place
                sizes = lengths.to_pylist()
                col = pc.if_else(over, pa.scalar(None, col.type), col)
        texts = col.to_pylist()
        ids = (batch.column(batch.schema.get_field_index(id_field)).to_pylist()
               if id_field else None)
        for i, text in enumerate(texts):
            n += 1
            ident = ids[i] if ids is not None else None
            if sizes is not None and sizes[i] is not None and sizes[i] > bound:
                yield Row(n, ident, None, too_big("the text cell", sizes[i], bound))
            else:
                yield Row(n, ident, text, None)


READERS = {".txt": read_txt, ".jsonl": read_jsonl, ".csv": read_csv, ".parquet": read_parquet}
