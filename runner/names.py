"""Identity: from an item id to the names of its files, and fingerprints of what it was.

An item's files (its outputs, its error file) are named from its *name*, which the
journal records once, at discovery, and never changes (see ``Journal.add``). This module
makes the proposal; the journal makes it unique.

The rule for one path component (:func:`component`):

* kept as written: letters of any script, digits, spaces, apostrophes, brackets, ``#``,
  ``&``, emoji, ``~``, backslash -- everything a Linux file name may hold;
* escaped as ``%XX`` (UTF-8 bytes, upper-case hex): ``/`` inside an id that is not a path,
  NUL and the other control characters (C0, DEL, C1) and ``%`` itself -- so the escape is
  reversible and the mapping injective; a lone surrogate (an undecodable file-name byte
  0x80-0xFF) becomes ``%`` and that byte in two hex digits, any other lone surrogate ``%u``
  and its code point in four hex digits;
* ``.`` and ``..`` become ``%2E`` and ``%2E%2E``; an empty id becomes ``%``;
* a component longer than :data:`NAME_BUDGET` bytes is cut at a character boundary and
  ends in ``~`` + 10 hex digits of a hash of the whole id (stable across runs).

The budget leaves room under the file system's 255-byte limit for a suffix
(``.<lang>.<fmt>``, ``.json``) and for a disambiguating tag (:func:`tag`), which the journal
appends when two names would still meet: on a case-insensitive or normalising file system
(:func:`fold`), or when two shortened names share a hash.

Fingerprints (:func:`text_fingerprint`, :func:`file_fingerprint`) say what an item was made
from; a resume compares them and re-queues an item whose input changed.
"""
from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from pathlib import Path

NAME_MAX = 255  # bytes in one path component (ext4, xfs, btrfs, tmpfs, NTFS in UTF-8)
SUFFIX_RESERVE = 16  # ".haw.json", ".json", ".en.srt": what a task adds after the name
TAG_LEN = 11  # "~" + 10 hex digits
NAME_BUDGET = NAME_MAX - SUFFIX_RESERVE - TAG_LEN  # 228 bytes kept whole


def _hash(text: str, n: int = 10) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()[:n]


def tag(item_id: str, n: int = 10) -> str:
    """The disambiguating suffix for ``item_id``: ``~`` + ``n`` hex digits of its hash."""
    return "~" + _hash(item_id, n)


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for an undecodable byte
        return f"%{code - 0xDC00:02X}"
    if 0xD800 <= code <= 0xDFFF:
        return f"%u{code:04X}"
    return "".join(f"%{b:02X}" for b in ch.encode("utf-8"))


# what is escaped: "/", "%", the control characters (category Cc: C0, DEL, C1), surrogates
_ESCAPED = re.compile("[/%\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def escape(text: str) -> str:
    """``text`` as one path component, unshortened (see the module docstring)."""
    if text in ("", ".", ".."):
        return {"": "%", ".": "%2E", "..": "%2E%2E"}[text]
    return _ESCAPED.sub(lambda m: _escape_char(m.group()), text)


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def shorten(name: str, whole: str, budget: int = NAME_BUDGET) -> str:
    """``name`` if it fits ``budget`` bytes; else its head and :func:`tag` of ``whole``."""
    if _utf8_len(name) <= budget:
        return name
    keep = budget - TAG_LEN
    head = name.encode("utf-8")[:keep].decode("utf-8", "ignore")
    return head + tag(whole)


def component(text: str, whole: str | None = None) -> str:
    """One safe, injective path component for ``text`` (``whole``: what the hash of a
    shortened name is taken of; default ``text``)."""
    return shorten(escape(text), text if whole is None else whole)


def relative(parts: list[str] | tuple[str, ...]) -> str:
    """A relative path of components (a file's folders and stem), each made safe on its
    own: every file of one folder lands in the same (perhaps shortened) folder."""
    return "/".join(component(p) for p in parts)


def is_unicode(text: str) -> bool:
    """Whether ``text`` is valid Unicode: no lone surrogate (JSON's "\\ud800" escape,
    os.walk's stand-in for a file-name byte that is not UTF-8), which SQLite refuses."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def fold(name: str) -> str:
    """The key under which two names meet on a case-insensitive or normalising file system
    (NTFS, exFAT, APFS, HFS+, SMB shares)."""
    if name.isascii():
        return name.lower()
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", name).casefold())


def flat(name: str) -> str:
    """A journal name (folders joined by ``/``) as one file name, e.g. for logs/errors/."""
    return name.replace("/", "%2F")


def text_fingerprint(text: str) -> str:
    """What an embed item was made from: a hash of its text."""
    return "b2:" + hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


HEAD_BYTES = 65536  # the head of a media file hashed into its fingerprint (in cache already)


def file_fingerprint(path: str | Path, st: os.stat_result | None = None) -> str:
    """What a media item was made from: size, mtime_ns and a hash of its first 64 KiB
    (cheap: discovery has just read the header from there)."""
    st = st or os.stat(path)
    with open(path, "rb") as fh:
        head = hashlib.blake2b(fh.read(HEAD_BYTES), digest_size=8).hexdigest()
    return f"{st.st_size}:{st.st_mtime_ns}:{head}"
