"""Layer: unit (no processes; property tests).

Cue builder and SRT/WebVTT writers: broadcaster norms hold for any word timings."""
from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.tasks.cues import CueRules, Word, build_cues, normalise_text, to_srt, to_vtt

RULES = CueRules()
VOCAB = ["the", "quick", "brown", "fox,", "jumps.", "and", "but", "because", "which", "so",
         "a", "Hello!", "world?", "x-->y", "<b>&", "it's", "extraordinarily", "—", ""]
SRT_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d),(\d\d\d) --> (\d\d):(\d\d):(\d\d),(\d\d\d)$")
VTT_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d\d\d) --> (\d\d):(\d\d):(\d\d)\.(\d\d\d)$")

word_text = st.one_of(
    st.sampled_from(VOCAB),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz.,", min_size=1, max_size=12),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=40, max_size=70),  # overlong
)
timed = st.tuples(word_text, st.floats(-0.3, 3.0), st.floats(0.0, 9.0))


def _words(spec):
    t, out = 0.0, []
    for text, gap, dur in spec:
        t = max(0.0, t + gap)
        out.append(Word(t, t + dur, " " + text))
        t += dur
    return out


def check_norms(words, cues, rules=RULES):
    expected = [normalise_text(w.text) for w in words if normalise_text(w.text)]
    assert [w for c in cues for w in c.words] == expected  # nothing lost or duplicated
    for k, c in enumerate(cues):
        nxt = cues[k + 1] if k + 1 < len(cues) else None
        dur = c.end - c.start
        assert 1 <= len(c.lines) <= rules.max_lines
        assert " ".join(c.lines) == " ".join(c.words)
        for line in c.lines:  # a line over the limit is a single overlong word
            assert len(line) <= rules.max_line_chars or line in c.words
        assert 0 <= c.start_ms < c.end_ms
        assert dur <= rules.max_duration + 1e-9
        if nxt is not None:
            assert c.end_ms <= nxt.start_ms  # no overlap
        capped = nxt is not None and c.end >= nxt.start - rules.min_gap - 1e-9
        assert dur >= rules.min_duration - 1e-9 or capped
        at_max = dur >= rules.max_duration - 0.0011  # capped at max_duration (whole ms)
        assert c.chars / dur <= rules.max_cps + 1e-6 or capped or at_max


def parse_blocks(text, timing, header=None):
    blocks = text.split("\n\n")
    if header is not None:
        assert blocks[0].rstrip("\n") == header
        blocks = blocks[1:]
    out = []
    for n, block in enumerate(b for b in blocks if b.strip()):
        lines = block.rstrip("\n").split("\n")
        assert lines[0] == str(n + 1)
        m = timing.match(lines[1])
        assert m, lines[1]
        g = [int(x) for x in m.groups()]
        start = ((g[0] * 60 + g[1]) * 60 + g[2]) * 1000 + g[3]
        end = ((g[4] * 60 + g[5]) * 60 + g[6]) * 1000 + g[7]
        assert lines[2:] and all(lines[2:])
        out.append((start, end, lines[2:]))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(timed, max_size=80), st.sets(st.integers(0, 80), max_size=10))
def test_norms_hold_for_any_timings(spec, seg_ends):
    words = _words(spec)
    cues = build_cues(words, RULES, seg_ends)
    check_norms(words, cues)


@settings(max_examples=150, deadline=None)
@given(st.lists(timed, max_size=40),
       st.builds(CueRules, max_line_chars=st.integers(5, 60), max_lines=st.integers(1, 3),
                 min_duration=st.floats(0, 2), max_duration=st.floats(2, 10),
                 max_cps=st.floats(5, 30), min_gap=st.floats(0, 0.2), max_pause=st.floats(0, 3)))
def test_norms_hold_for_any_rules(spec, rules):
    words = _words(spec)
    check_norms(words, build_cues(words, rules), rules)


@settings(max_examples=150, deadline=None)
@given(st.lists(timed, max_size=40))
def test_srt_and_vtt_round_trip(spec):
    cues = build_cues(_words(spec))
    srt = to_srt(cues)
    got = parse_blocks(srt, SRT_TIME)
    assert [(s, e) for s, e, _ in got] == [(c.start_ms, c.end_ms) for c in cues]
    assert [ls for _, _, ls in got] == [[x.replace("-->", "->") for x in c.lines] for c in cues]
    vtt = to_vtt(cues)
    assert vtt.startswith("WEBVTT\n")
    got = parse_blocks(vtt, VTT_TIME, header="WEBVTT")
    assert [(s, e) for s, e, _ in got] == [(c.start_ms, c.end_ms) for c in cues]
    for _, _, lines in got:
        assert all("-->" not in line for line in lines)
        unescaped = [x.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&") for x in lines]
        assert unescaped in [list(c.lines) for c in cues]


def test_empty_transcript_writes_valid_empty_files():
    assert build_cues([]) == []
    assert to_srt([]) == ""
    assert to_vtt([]) == "WEBVTT\n"


def test_overlong_word_kept_whole_on_its_own_line():
    long = "https://example.com/" + "a" * 50
    words = _words([("see", 0.1, 0.3), (long, 0.1, 1.0), ("now", 0.1, 0.3)])
    cues = build_cues(words)
    lines = [line for c in cues for line in c.lines]
    assert long in lines  # whole, alone on its line
    check_norms(words, cues)


def test_breaks_prefer_punctuation_and_conjunctions():
    text = ("I went to the market this morning to buy some fresh bread, "
            "and then I walked home because it was a lovely sunny day.")
    words = _words([(w, 0.05, 0.25) for w in text.split()])
    cues = build_cues(words)
    check_norms(words, cues)
    lines = [line for c in cues for line in c.lines]
    assert any(line.endswith("bread,") for line in lines), lines  # break after the comma
    assert any(line.startswith("because") for line in lines), lines  # before the conjunction
    assert any(line.startswith("and then") for line in lines), lines


def test_min_duration_extends_into_silence_but_not_over_next_cue():
    words = _words([("Yes.", 0.0, 0.2), ("No.", 5.0, 0.2)])
    a, b = build_cues(words)
    assert a.end - a.start >= RULES.min_duration and a.end <= b.start
    close = _words([("Yes.", 0.0, 0.2), ("No.", 0.1, 0.2)])  # speech forces a short cue
    narrow = CueRules(max_line_chars=4, max_lines=1)  # forces two cues 0.1 s apart
    c = build_cues(close, narrow)
    assert len(c) == 2 and c[0].end_ms <= c[1].start_ms
    assert c[0].end - c[0].start < narrow.min_duration  # the next cue's start wins
    check_norms(close, c, narrow)


def test_long_speech_is_split_under_max_duration():
    words = _words([("word", 0.0, 0.5)] * 40)  # 20 s without a pause
    cues = build_cues(words)
    assert len(cues) >= 3
    check_norms(words, cues)
