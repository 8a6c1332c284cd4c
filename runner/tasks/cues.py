"""Subtitle cues from word timings, and the SRT / WebVTT writers (pure Python, no torch).

``build_cues`` groups Whisper's timed words into cues that follow broadcaster norms
(Netflix / BBC style), every limit a field of :class:`CueRules`:

* at most ``max_lines`` lines of at most ``max_line_chars`` characters. A single word longer
  than a line is never split or dropped: it gets a line to itself and that line may be longer
  (splitting would corrupt URLs and names, and players wrap long lines anyway);
* the speech a cue covers spans at most ``max_duration`` and never a pause longer than
  ``max_pause``; its display lasts at most ``max_duration`` (a single word spoken for longer
  is shown for ``max_duration``);
* cue ends are extended into the following silence to reach ``min_duration`` and a reading
  speed of at most ``max_cps`` characters per second, stopping ``min_gap`` before the next
  cue. When speech forces it the order of precedence is: no overlap > ``max_duration`` >
  the next cue starting on time > ``min_duration`` > ``max_cps``; i.e. a cue followed
  immediately by more speech stays short (and may read fast) rather than delay its successor;
* cue and line breaks are chosen by dynamic programming over all break points, preferring
  sentence ends, pauses and segment ends, then clause punctuation, then the point before a
  conjunction or relative word ("and", "but", "because", "which" ...), and avoiding
  mid-phrase breaks.

Every input word (whitespace-normalised, empty ones ignored) appears in exactly one cue, in
order: ``[w for c in cues for w in c.words] == [normalised input words]``. Times are kept in
integer milliseconds so the written files round-trip exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

_SENTENCE_END = (".", "?", "!", "…", '."', '?"', '!"', ".'", "?'", "!'", ".)", "?)", "!)")
_CLAUSE_END = (",", ";", ":", "–", "—", '",', "',")
_CONJUNCTIONS = frozenset(
    "and but or nor so yet because although though while whereas if unless until when "
    "whenever where wherever that which who whom whose since after before as than then "
    "however therefore".split()
)


@dataclass(frozen=True)
class CueRules:
    """Limits for subtitle cues (defaults follow Netflix English / BBC guidelines)."""

    max_line_chars: int = 42  # characters per line (a lone overlong word may exceed it)
    max_lines: int = 2  # lines per cue
    min_duration: float = 0.833  # seconds a cue stays up, if the silence after it allows
    max_duration: float = 7.0  # seconds a cue stays up, hard limit
    max_cps: float = 20.0  # reading speed limit in characters per second (spaces count)
    min_gap: float = 0.083  # seconds kept free before the next cue when extending an end
    max_pause: float = 1.5  # a cue never spans a silence between words longer than this

    def problems(self) -> list[str]:
        """One line per bad limit (empty when all are usable)."""
        out = []
        if self.max_line_chars < 1:
            out.append(f"max_line_chars={self.max_line_chars}: must be >= 1")
        if self.max_lines < 1:
            out.append(f"max_lines={self.max_lines}: must be >= 1")
        if not 0 <= self.min_duration <= self.max_duration:
            out.append(f"min_duration={self.min_duration}: must be in [0, max_duration]")
        if not self.max_duration > 0:
            out.append(f"max_duration={self.max_duration}: must be > 0")
        if not self.max_cps > 0:
            out.append(f"max_cps={self.max_cps}: must be > 0")
        if not 0 <= self.min_gap < 1:
            out.append(f"min_gap={self.min_gap}: must be in [0, 1) seconds")
        if not self.max_pause >= 0:
            out.append(f"max_pause={self.max_pause}: must be >= 0")
        return out


@dataclass(frozen=True)
class Word:
    """One timed word (seconds); ``text`` may carry Whisper's leading space."""

    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Cue:
    """One subtitle: display interval in milliseconds, the words it shows, its lines."""

    start_ms: int
    end_ms: int
    words: tuple[str, ...]
    lines: tuple[str, ...]

    @property
    def start(self) -> float:
        return self.start_ms / 1000

    @property
    def end(self) -> float:
        return self.end_ms / 1000

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def chars(self) -> int:
        """Characters a viewer reads: the lines without the line breaks."""
        return sum(len(line) for line in self.lines)


def normalise_text(text: str) -> str:
    """A word as it appears in cues: inner whitespace collapsed, ends stripped."""
    return " ".join(str(text).split())


def _break_cost(word: str, nxt: str | None) -> float:
    """Cost of breaking (a line or a cue) after ``word``, before ``nxt``."""
    if nxt is None:
        return 0.0
    if word.endswith(_SENTENCE_END):
        return 0.0
    if word.endswith(_CLAUSE_END):
        return 1.0
    if nxt.lower().strip("\"'(“‘") in _CONJUNCTIONS:
        return 2.0
    return 6.0


def _clean_words(words: Iterable[Word | tuple], segment_ends: set[int]) -> tuple[list, set[int]]:
    """Normalised words as (start_ms, end_ms, text), times made monotonic and non-negative."""
    out: list[tuple[int, int, str]] = []
    ends: set[int] = set()
    last_start = 0
    for i, w in enumerate(words):
        start, end, text = (w.start, w.end, w.text) if isinstance(w, Word) else w[:3]
        text = normalise_text(text)
        if text:
            s = _ms(start)
            s = max(s, last_start)
            e = max(_ms(end), s)
            out.append((s, e, text))
            last_start = s
        if i in segment_ends and out:
            ends.add(len(out) - 1)
    return out, ends


def _ms(seconds: float) -> int:
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        return 0
    if not math.isfinite(value) or value < 0:
        return 0
    return int(round(value * 1000))


class _Layout:
    """Best line layout of words[j:i] under the rules, using prefix sums of word lengths."""

    def __init__(self, texts: Sequence[str], rules: CueRules):
        self.texts = texts
        self.rules = rules
        self.prefix = [0]
        for t in texts:
            self.prefix.append(self.prefix[-1] + len(t))

    def width(self, j: int, i: int) -> int:
        """Characters of words[j:i] joined by single spaces."""
        return self.prefix[i] - self.prefix[j] + (i - j - 1)

    def line_ok(self, j: int, i: int) -> bool:
        return i - j == 1 or self.width(j, i) <= self.rules.max_line_chars

    def best(self, j: int, i: int) -> tuple[float, list[int]] | None:
        """(cost, line starts) of the best layout of words[j:i], or None if none fits."""
        return self._best(j, i, self.rules.max_lines)

    def _best(self, j: int, i: int, lines: int) -> tuple[float, list[int]] | None:
        if self.line_ok(j, i):
            return 0.0, [j]
        if lines <= 1:
            return None
        best: tuple[float, list[int]] | None = None
        for k in range(j + 1, i):
            if not self.line_ok(j, k):
                break
            rest = self._best(k, i, lines - 1)
            if rest is None:
                continue
            width = self.rules.max_line_chars
            imbalance = abs(self.width(j, k) - self.width(k, i)) / width
            # bottom-heavy (pyramid) is mildly preferred
            shape = 0.2 if self.width(j, k) > self.width(k, i) else 0.0
            cost = 0.5 * _break_cost(self.texts[k - 1], self.texts[k]) + imbalance + shape + rest[0]
            if best is None or cost < best[0]:
                best = (cost, [j] + rest[1])
        return best


def build_cues(
    words: Iterable[Word | tuple], rules: CueRules = CueRules(), segment_ends: Iterable[int] = (),
    until: float | None = None,
) -> list[Cue]:
    """Cues for ``words`` (Word or (start, end, text)); ``segment_ends`` are indices of words
    that end a Whisper segment (a preferred break). ``until``: the media's length in seconds;
    no cue is extended past it (a stitched long file's last cue stays inside the recording)."""
    items, seg_ends = _clean_words(words, set(segment_ends))
    n = len(items)
    if n == 0:
        return []
    texts = [t for _, _, t in items]
    layout = _Layout(texts, rules)
    # limits in whole ms, rounded so that the written times honour them exactly
    max_dur = max(1, math.floor(rules.max_duration * 1000))
    max_pause = _ms(rules.max_pause)
    min_gap = math.floor(rules.min_gap * 1000)
    max_chars = rules.max_line_chars * rules.max_lines

    def boundary_cost(i: int) -> float:  # breaking after word i-1
        if i >= n:
            return 0.0
        cost = _break_cost(texts[i - 1], texts[i])
        if i - 1 in seg_ends or items[i][0] - items[i - 1][1] >= 400:
            cost = min(cost, 0.5)
        return cost

    inf = float("inf")
    best = [inf] * (n + 1)
    back = [0] * (n + 1)
    lines_at: dict[tuple[int, int], list[int]] = {}
    best[0] = 0.0
    for i in range(1, n + 1):
        for j in range(i - 1, -1, -1):
            if j < i - 1:
                if items[j + 1][0] - items[j][1] > max_pause:
                    break  # words[j:i] would span a long pause
                if items[i - 1][1] - items[j][0] > max_dur:
                    break
                if layout.width(j, i) > max_chars + rules.max_line_chars:
                    break  # too wide for any layout, even with an overlong word
            if best[j] == inf:
                continue
            lay = layout.best(j, i)
            if lay is None:
                continue
            start = items[j][0]
            limit = items[i][0] - min_gap if i < n else start + max_dur
            avail = max(items[i - 1][1], min(start + max_dur, limit)) - start
            chars = layout.width(j, i)
            speed = chars / max(avail, 1) * 1000
            cost = 1.0 + 2.0 * boundary_cost(i) + lay[0]
            cost += 0.5 * max(0.0, speed - rules.max_cps)
            if avail < rules.min_duration * 1000:
                cost += 2.0
            total = best[j] + cost
            if total < best[i]:
                best[i] = total
                back[i] = j
                lines_at[(j, i)] = lay[1]
    bounds = []
    i = n
    while i > 0:
        bounds.append((back[i], i))
        i = back[i]
    bounds.reverse()
    return _time_cues(items, bounds, lines_at, rules, min_gap, max_dur,
                      None if until is None else _ms(until))


def _time_cues(items, bounds, lines_at, rules: CueRules, min_gap: int, max_dur: int,
               until: int | None = None) -> list[Cue]:
    cues: list[Cue] = []
    prev_end = 0
    min_dur = math.ceil(rules.min_duration * 1000)
    for c, (j, i) in enumerate(bounds):
        start = max(items[j][0], prev_end)
        speech_end = max(items[i - 1][1], start + 1)
        nxt = items[bounds[c + 1][0]][0] if c + 1 < len(bounds) else None
        starts = lines_at[(j, i)] + [i]
        lines = tuple(" ".join(w for _, _, w in items[a:b]) for a, b in zip(starts, starts[1:]))
        chars = sum(len(line) for line in lines)
        want = max(speech_end, start + min_dur, start + math.ceil(chars * 1000 / rules.max_cps))
        end = min(want, start + max_dur)
        if nxt is not None:
            end = min(end, nxt - min_gap)  # extension stops short of the next cue
            end = max(end, min(speech_end, start + max_dur))  # speech itself is kept
            end = min(end, nxt)  # never overlap: the next cue starts on time
        elif until is not None:
            end = max(min(end, until), speech_end)  # the display ends with the media
        end = max(end, start + 1)
        cues.append(Cue(start, end, tuple(w for _, _, w in items[j:i]), lines))
        prev_end = end
    return cues


# ---- writers --------------------------------------------------------------------------


def _clock(ms: int, sep: str) -> str:
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, milli = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{milli:03d}"


def to_srt(cues: Sequence[Cue]) -> str:
    """SubRip: numbered from 1, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, a blank line between cues."""
    blocks = []
    for n, cue in enumerate(cues, 1):
        text = "\n".join(line.replace("-->", "->") for line in cue.lines)
        blocks.append(f"{n}\n{_clock(cue.start_ms, ',')} --> {_clock(cue.end_ms, ',')}\n{text}\n")
    return "\n".join(blocks)


def _vtt_escape(line: str) -> str:
    # WebVTT cue text escapes &, < and >; escaping ">" also removes any "-->"
    return line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_vtt(cues: Sequence[Cue]) -> str:
    """WebVTT: ``WEBVTT`` header, ``HH:MM:SS.mmm`` times, escaped text (never ``-->``)."""
    blocks = ["WEBVTT\n"]
    for n, cue in enumerate(cues, 1):
        text = "\n".join(_vtt_escape(line) for line in cue.lines)
        blocks.append(f"{n}\n{_clock(cue.start_ms, '.')} --> {_clock(cue.end_ms, '.')}\n{text}\n")
    return "\n".join(blocks)
