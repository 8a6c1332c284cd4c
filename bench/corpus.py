"""A deterministic benchmark corpus: N templated English sentences, no download.

Every sentence is built from a fixed seed, so two runs (and two machines) embed exactly
the same texts. Lengths vary the way real sentences do: a short main clause plus a
geometric number of subordinate clauses, from 8 to about 100 words (median 17),
so batches mix short and long texts and padding matters as it does on real data.

    python bench/corpus.py --count 20000 --out /tmp/corpus.jsonl   # writes, prints stats
    from bench.corpus import write_corpus, sentences                 # from a bench script

Each line of the .jsonl is ``{"id": "s-000000", "text": "..."}``.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

SUBJECTS = ("a student", "the orchestra", "an engineer", "the committee", "a volunteer",
            "the old ferry", "a botanist", "the night shift", "our neighbour", "the archive",
            "a young pilot", "the village choir", "the surveyor", "a retired teacher",
            "the research team", "a tired courier", "the museum", "a fisherman")
VERBS = ("recorded", "catalogued", "repaired", "described", "translated", "photographed",
         "reviewed", "measured", "painted", "rebuilt", "questioned", "mapped", "carried",
         "restored", "summarised", "ignored", "celebrated", "borrowed")
OBJECTS = ("letters from 1962", "a lecture on tides", "the broken lighthouse lamp",
           "an unfinished symphony", "the harbour records", "three crates of seed potatoes",
           "a map of the northern valleys", "the station clock", "a cooking programme",
           "the minutes of every meeting", "a set of glass negatives", "the mountain road",
           "a box of railway timetables", "the school's weather diary", "two rare orchids")
ADVERBIALS = ("before dawn", "after the flood", "with great care", "in the rain",
              "for the third time", "without telling anyone", "during the long winter",
              "on a borrowed laptop", "at the edge of town", "in under an hour")
CLAUSES = ("because the deadline had moved again", "while the power kept failing",
           "although nobody had asked for it", "so that the children could read it later",
           "and the results surprised everyone in the building",
           "but the second half of the work was lost in a storm",
           "since the original copies were fading quickly",
           "even though the budget covered only paper and ink",
           "after a long argument about who should pay for the repairs",
           "which took far longer than the planning documents had promised",
           "until the last volunteers went home for the night",
           "as the town council watched from the upper gallery")


def sentence(rng: random.Random) -> str:
    """One sentence: main clause + adverbial + 0..n clauses (geometric, p=0.45)."""
    parts = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(ADVERBIALS)]
    while rng.random() < 0.55 and len(parts) < 14:
        parts.append(rng.choice(CLAUSES))
    text = " ".join(parts)
    return text[0].upper() + text[1:] + "."


def sentences(count: int, seed: int = 1234) -> list[str]:
    """``count`` sentences, identical for the same (count, seed) on every machine."""
    rng = random.Random(seed)
    return [sentence(rng) for _ in range(count)]


def write_corpus(path: Path, count: int = 20_000, seed: int = 1234) -> list[str]:
    """Write ``count`` sentences to ``path`` (.jsonl, fields id and text); return the texts."""
    texts = sentences(count, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for i, t in enumerate(texts):
            fh.write(json.dumps({"id": f"s-{i:06d}", "text": t}) + "\n")
    return texts


def stats(texts: list[str]) -> dict[str, float]:
    words = [len(t.split()) for t in texts]
    return {"count": len(texts), "words_min": min(words), "words_median": statistics.median(words),
            "words_mean": round(statistics.fmean(words), 1), "words_max": max(words)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    texts = write_corpus(a.out, a.count, a.seed)
    print(json.dumps({"path": str(a.out), **stats(texts)}))


if __name__ == "__main__":
    main()
