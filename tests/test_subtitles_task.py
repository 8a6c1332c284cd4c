"""Layer: unit (the task called in-process, no workers; ffmpeg and espeak-ng make its inputs).

The subtitles task called directly (no executor): discovery, models, outputs, errors."""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from runner.tasks.base import BadInput, BadItem, ConfigError, Item, WriteContext
from runner.tasks.subtitles import SAMPLES, SubtitlesConfig, SubtitlesTask
from runner.tasks import whisper as wh
from tests.speech import synthesise, wer

SENTENCES = [
    "The children played football in the park until the sun went down.",
    "My brother bought a new bicycle and rides it to work every day.",
]


def ctx(run_dir: Path, n: int = 1) -> WriteContext:
    return WriteContext(run_dir=run_dir, batch_no=1, slot=0, device="cpu:0", model="tiny.en",
                        batch_size=n)


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech")
    (root / "b").mkdir()
    synthesise(SENTENCES[0], root / "b" / "kids.wav")
    synthesise(SENTENCES[1], root / "a.mp3")
    subprocess.run(["sox", "-n", "-r", "16000", "-c", "1", str(root / "silent.wav"), "trim", "0", "2"],
                   check=True)
    return root


@pytest.fixture(scope="module")
def fw_task():
    return SubtitlesTask(formats=["srt", "vtt", "json"])


@pytest.fixture(scope="module")
def tiny(fw_task):
    rung = fw_task.model_chain("cpu")[0]
    assert rung.available, rung.reason
    return fw_task.load_model(rung, "cpu")


# ---- config and checks -----------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("backend", "tensorflow"), ("formats", ["srt", "ass"]),
                                         ("language", "English"), ("beam_size", 0),
                                         ("max_line_chars", 0), ("compute_type", "int3")])
def test_bad_settings_name_field_and_value(field, value):
    with pytest.raises(ConfigError) as err:
        SubtitlesTask(**{field: value})
    msg = str(err.value)
    assert f"task.{field}" in msg and "\n" not in msg


def test_defaults_find_the_samples():
    task = SubtitlesTask()
    assert Path(SubtitlesConfig().input) == SAMPLES
    ids = [i.id for i in task.discover()]
    assert ids == sorted(ids) and len(ids) == 3 and "TRANSCRIPTS.txt" not in ids


def test_missing_input_is_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        SubtitlesTask(input=str(tmp_path / "nope")).check(frozenset({"cpu"}))
    assert "task.input" in str(err.value) and "\n" not in str(err.value)


def test_missing_ffmpeg_is_one_line_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no ffmpeg on PATH
    SubtitlesTask(backend="faster-whisper").check(frozenset({"cpu"}))  # does not need it
    for task, backends in [(SubtitlesTask(backend="openai-whisper"), {"cpu"}),
                           (SubtitlesTask(), {"cpu", "xpu"})]:  # auto: openai on xpu
        with pytest.raises(ConfigError) as err:
            task.check(frozenset(backends))
        assert "ffmpeg" in str(err.value) and "\n" not in str(err.value)


# ---- discovery --------------------------------------------------------------------------

def test_discover_is_sorted_recursive_filtered(speech_dir, tmp_path):
    root = tmp_path / "in"
    shutil.copytree(speech_dir, root)
    (root / "notes.txt").write_text("not audio")
    (root / ".hidden.wav").write_bytes((root / "silent.wav").read_bytes())
    (root / "z.WAV").write_bytes((root / "silent.wav").read_bytes())
    task = SubtitlesTask(input=str(root))
    items = list(task.discover())
    assert [i.id for i in items] == ["a.mp3", "b/kids.wav", "silent.wav", "z.WAV"]
    assert all(Path(i.payload).is_absolute() and Path(i.payload).is_file() for i in items)
    assert items[2].cost == pytest.approx(2.0, abs=0.01)
    assert all(i.cost > 1 for i in items)
    for n in range(len(items) + 1):  # a limit takes a prefix, whatever N
        assert list(itertools.islice(task.discover(), n)) == items[:n]
    one = list(SubtitlesTask(input=str(root / "b" / "kids.wav")).discover())
    assert [i.id for i in one] == ["kids.wav"]


def test_corrupt_and_empty_files_are_bad_items(tmp_path, fw_task, tiny):
    (tmp_path / "broken.wav").write_bytes(os.urandom(4000))
    (tmp_path / "empty.mp3").write_bytes(b"")
    found = list(SubtitlesTask(input=str(tmp_path)).discover())
    assert [type(f) for f in found] == [BadItem, BadItem]
    for f in found:
        assert f.id in f.error and "\n" not in f.error
    for name in ("broken.wav", "empty.mp3"):
        with pytest.raises(BadInput, match=name):
            fw_task.process(tiny, [Item(name, 1.0, str(tmp_path / name))])


# ---- models -------------------------------------------------------------------------------

def test_model_chain_reports_unavailable_without_raising(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rungs = SubtitlesTask(models=["tiny", "large-v3", str(tmp_path / "none")]).model_chain("cpu")
    assert rungs[0].available and "tiny.en" in rungs[0].reason  # .en preferred for language=en
    assert not rungs[1].available and not rungs[2].available
    assert all(r.reason and "\n" not in r.reason for r in rungs)
    assert not SubtitlesTask(models=["tiny.en"], language="de").model_chain("cpu")[0].available


def test_bundled_base_is_assembled_once(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    rung = wh.resolve("base", wh.FASTER, "auto")
    assert rung.available, rung.reason
    target = tmp_path / "runner" / "whisper-base-ct2"
    assert Path(rung.source) == target and (target / "model.bin").is_file()
    mtime = (target / "model.bin").stat().st_mtime_ns
    assert wh.resolve("base", wh.FASTER, "auto").source == rung.source
    assert (target / "model.bin").stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert [p.name for p in target.parent.iterdir()] == ["whisper-base-ct2"]  # no temp left


# ---- transcription and outputs (faster-whisper, bundled tiny.en) -------------------------

@pytest.mark.timeout(120)
def test_espeak_speech_transcribed_within_wer(speech_dir, fw_task, tiny):
    items = [Item("a.mp3", 0, str(speech_dir / "a.mp3")),
             Item("kids.wav", 0, str(speech_dir / "b" / "kids.wav"))]
    results = fw_task.process(tiny, items)
    for ref, res in zip([SENTENCES[1], SENTENCES[0]], results):
        hyp = " ".join(w.text for s in res.transcript.segments for w in s.words)
        assert wer(ref, hyp) <= 0.2, hyp
        assert res.proc_s > 0 and res.duration > 1


@pytest.mark.timeout(120)
def test_samples_transcribed_and_written(tmp_path, fw_task, tiny):
    refs = dict(line.split("\t") for line in (SAMPLES / "TRANSCRIPTS.txt").read_text().splitlines()
                if "\t" in line)
    items = list(fw_task.discover())
    results = fw_task.process(tiny, items)
    outs = fw_task.write(items, results, ctx(tmp_path, len(items)))
    # <stem>.<lang>.<fmt>: the name players pair with the media file
    assert outs == [f"subtitles/{i.id.rsplit('.', 1)[0]}.en.srt" for i in items]
    hyps = []
    for item, res in zip(items, results):
        stem = item.id.rsplit(".", 1)[0]
        data = json.loads((tmp_path / "subtitles" / f"{stem}.en.json").read_text())
        assert data["model"] == "tiny.en" and data["device"] == "cpu:0"
        assert data["language"] == "en" and data["duration"] == pytest.approx(item.cost)
        hyps.append(" ".join(w["text"] for s in data["segments"] for w in s["words"]))
        assert (tmp_path / "subtitles" / f"{stem}.en.vtt").read_text().startswith("WEBVTT\n")
        assert fw_task.item_metrics(item, res) == {"media_s": res.duration, "proc_s": res.proc_s}
    # over all samples (espeak-ng's "at nine" tends to come out as "set high")
    assert wer(" ".join(refs[i.id] for i in items), " ".join(hyps)) <= 0.2, hyps


@pytest.mark.timeout(60)
def test_silence_gives_empty_subtitles(speech_dir, tmp_path, fw_task, tiny):
    item = Item("silent.wav", 2.0, str(speech_dir / "silent.wav"))
    [res] = fw_task.process(tiny, [item])
    assert res.transcript.segments == []
    fw_task.write([item], [res], ctx(tmp_path))
    out = tmp_path / "subtitles"
    assert (out / "silent.wav.en.srt").read_text() == ""
    assert (out / "silent.wav.en.vtt").read_text() == "WEBVTT\n"
    assert json.loads((out / "silent.wav.en.json").read_text())["segments"] == []


def test_item_ids_cannot_escape_the_run_dir(tmp_path, speech_dir, fw_task):
    run = tmp_path / "run"
    res = fw_task.process(_Fake(), [Item("x", 2.0, str(speech_dir / "silent.wav"))])
    for bad in ("../../x.wav", "/etc/passwd", "a/../../b.wav", "~/c.wav"):
        [rel] = fw_task.write([Item(bad, 2.0, "")], res, ctx(run))
        path = (run / rel).resolve()
        assert path.is_file() and path.is_relative_to((run / "subtitles").resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


class _Fake:
    name = "fake"

    def transcribe(self, path, audio, opts):  # never called for silence
        raise AssertionError("model run on a silent file")


# ---- openai-whisper with a random tiny checkpoint ---------------------------------------

@pytest.mark.timeout(240)
def test_openai_whisper_random_tiny_checkpoint(tmp_path, speech_dir):
    torch = pytest.importorskip("torch")
    pytest.importorskip("whisper")
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(0)
    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6,
                           n_audio_layer=4, n_vocab=51864, n_text_ctx=448, n_text_state=384,
                           n_text_head=6, n_text_layer=4)
    ckpt = tmp_path / "random-tiny.pt"
    torch.save({"dims": dims.__dict__, "model_state_dict": Whisper(dims).state_dict()}, ckpt)
    task = SubtitlesTask(input=str(speech_dir), backend="openai-whisper", models=[str(ckpt)],
                         formats=["srt", "vtt", "json"], beam_size=1, temperature=[0.0],
                         max_new_tokens=8, no_speech_drop=1.0)
    task.check(frozenset({"cpu"}))
    [rung] = task.model_chain("cpu")
    assert rung.available and rung.source == str(ckpt), rung.reason
    model = task.load_model(rung, "cpu")
    assert isinstance(model, wh.OpenAIWhisperBackend)
    item = Item("a.mp3", 3.0, str(speech_dir / "a.mp3"))
    [res] = task.process(model, [item])
    assert res.transcript.backend == wh.OPENAI and res.transcript.language == "en"
    for seg in res.transcript.segments:
        assert isinstance(seg.text, str) and seg.start <= seg.end
        for w in seg.words:
            assert w.start <= w.end and 0 <= w.probability <= 1
    [rel] = task.write([item], [res], ctx(tmp_path / "run"))
    out = tmp_path / "run" / "subtitles"
    assert rel == "subtitles/a.mp3.en.srt" and (out / "a.mp3.en.srt").is_file()
    assert (out / "a.mp3.en.vtt").read_text().startswith("WEBVTT")
    data = json.loads((out / "a.mp3.en.json").read_text())
    assert data["backend"] == wh.OPENAI and isinstance(data["segments"], list)


def test_duration_falls_back_to_packet_timestamps():
    import av

    from runner import media

    path = SAMPLES / "fox.wav"
    with av.open(str(path)) as container:
        from_packets = media._duration_from_packets(container, container.streams.audio[0])
    assert from_packets == pytest.approx(media.duration(path), abs=0.05)
