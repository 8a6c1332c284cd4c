"""The embed task: sentence-transformers embeddings of a text corpus, as Parquet shards.

Inputs: a ``.txt`` file (one text per line), ``.jsonl``, ``.csv`` or ``.parquet`` (fields
``text_field`` and ``id_field``; the id defaults to the line/row number, prefixed with the
file's relative path when the input is a folder), or a folder of such files. An empty
text, an undecodable line, a bad JSON line, a missing field, an item over
``task.max_item_bytes`` or a FIFO/device/socket in the folder (never opened) is a BadItem:
failed with a one-line error, the other items go on. The readers (runner/tasks/embed_input.py)
hold at most about ``max_item_bytes`` of any one line, and a text's token count is taken on
its first 64 KiB, so the controller's memory does not grow with the longest line.

Outputs: ``embeddings/part-NNNNN.parquet`` (one per dispatched batch; ``-OOOO`` is appended
when the OOM ladder or a bad item split the batch) with columns id (string), vector
(fixed_size_list<float32>) and the rung each row came from: model (string), batch_size
(int32), device (string, e.g. cuda:1), precision (string: fp32, fp16 or bf16, what the
model ran in); ``embeddings/manifest.json`` lists the shards that hold done items, their row
counts, the dim, the models, the rows per precision and the normalisation.

Precision (``task.precision``): auto = fp16 on cuda/xpu, fp32 on cpu (and anything else);
fp32, fp16 or bf16 force one. The stored vectors are float32 whatever the model ran in.
Tolerance: a half-precision vector's cosine similarity to the fp32 vector of the same text is
>= COSINE_TOLERANCE (0.999; measured on CPU for bf16 and fp16 with all-MiniLM-L6-v2,
bench/bench_batched.py, bench/RESULTS.md "Batched decode and half precision").
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from runner import names
from runner.errors import one_line
from runner.rundir import atomic_path, atomic_write_json
from runner.tasks.base import (ON_DUPLICATE, BadItem, ConfigError, FinalizeContext, Item, ModelRung, Task,
                               TaskConfig, WriteContext, check_input_path, file_kind, ranged)
from runner.tasks.embed_input import MISSING as _MISSING
from runner.tasks.embed_input import READERS

from runner.tasks.embed_models import (  # noqa: F401 (re-exported: tests, the plan)
    BUNDLED, COUNT_CHARS, TokenCounter, _bundled_path, _hf_cached, _hub_dir, _tokenizer_folder)

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
SUFFIXES = tuple(READERS)  # .txt .jsonl .csv .parquet
COSTS = ("tokens", "chars")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
#: a half-precision vector's cosine similarity to fp32's, at least (tests/test_embed.py)
COSINE_TOLERANCE = 0.999
#: tokens are counted on this many characters of a text at most, the count scaled by length
#: beyond it (the model truncates at max_seq_length anyway): a long text costs no more
#: discovery counts tokens this many items, or this many characters, at a time
COUNT_ITEMS, COUNT_BATCH_CHARS = 1024, 8 << 20
log = logging.getLogger("runner")


@dataclass
class EmbedConfig(TaskConfig):
    _target_: str = "runner.tasks.embed.EmbedTask"  # the task class
    name: str = "embed"  # run dirs: <outputs>/embed/...
    input: str = str(SAMPLES / "corpus.jsonl")  # a .txt/.jsonl/.csv/.parquet file or a folder
    models: list[str] = field(default_factory=lambda: ["all-MiniLM-L6-v2"])  # first preferred
    text_field: str = "text"  # field/column holding the text (jsonl, csv, parquet)
    id_field: Optional[str] = None  # field/column holding the id; null = line/row number
    normalize: bool = False  # L2-normalise vectors (cosine similarity = dot product)
    allow_download: bool = False  # let sentence-transformers fetch a model not found locally
    default_batch_size: int = ranged(64, ge=1)  # used when the top-level batch_size is null
    # the largest item, in bytes as stored: a .txt/.jsonl line (a JSON line whole), a
    # .csv/.parquet text cell; a bigger one fails at discovery (split it or raise this), and
    # discovery never holds more of one line than this: 1 MB is ~250,000 tokens, far past
    # what sentence-transformers models read (they truncate at max_seq_length)
    max_item_bytes: Optional[int] = ranged(1_000_000, ge=1, none="no limit")
    # an item's cost (batches of similar cost, size_balanced, the plan): tokens = counted with
    # the first model's own tokenizer, as the model sees them (chars when it has no local
    # tokenizer.json); chars = characters of the text
    cost: str = "tokens"
    # an id that appears twice: error (refuse the run, naming both lines) | keep_first (later
    # copies ignored, counted) | suffix (later copies become <id>#2, <id>#3, ...)
    on_duplicate_id: str = "error"
    # what the model computes in: auto (fp16 on cuda/xpu, fp32 on cpu) | fp32 | fp16 | bf16;
    # vectors are stored as float32 either way (cosine to fp32 >= COSINE_TOLERANCE)
    precision: str = "auto"


def _kind(value: Any) -> str:
    return {bool: "boolean", int: "number", float: "number", list: "list",
            dict: "JSON object"}.get(type(value), type(value).__name__)


def _text_error(text: Any, field_name: str) -> str | None:
    """Why ``text`` cannot be embedded, or None: it must be a non-blank string."""
    if text is None:
        return f"text field {field_name!r} is null; give it a string"
    if not isinstance(text, str):
        return f"text field {field_name!r} is a {_kind(text)}, not a string"
    if not text.strip():
        return "empty text"
    if not names.is_unicode(text):
        return "text has an unpaired surrogate (a broken \\ud8xx escape); fix the text"
    return None



_DICT_COLUMNS = ["model", "device", "precision"]  # repeated values: dictionary pages


def choose_precision(setting: str, device: str) -> str:
    """fp32, fp16 or bf16 for ``task.precision`` on ``device`` (``cuda:1`` is cuda): auto is
    fp16 on cuda and xpu, fp32 elsewhere (a CPU's half precision is slower, or no faster)."""
    if setting != "auto":
        return setting
    return "fp16" if device.split(":", 1)[0] in ("cuda", "xpu") else "fp32"


def _precisions(path: Path) -> dict[str, int]:
    """Rows per precision in a shard (a shard from before the column: fp32)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if "precision" not in pf.schema_arrow.names:
        return {"fp32": pf.metadata.num_rows}
    out: dict[str, int] = {}
    for value in pf.read(columns=["precision"]).column("precision").to_pylist():
        out[value] = out.get(value, 0) + 1
    return out


class EmbedTask(Task):
    name = "embed"
    output_dir = "embeddings"
    #: a batch costs as much as its longest text (padding): cut pages into similar-length batches
    sort_batches_by_cost = True
    #: many items per shard: the journal's one-output-per-item rule does not apply
    shared_outputs = True

    def __init__(self, **fields: Any):
        fields.pop("_target_", None)
        self.cfg = EmbedConfig(**fields)
        if not self.cfg.models:
            raise ConfigError("task.models is empty: name at least one model, e.g. [all-MiniLM-L6-v2]")
        if self.cfg.cost not in COSTS:
            raise ConfigError(f"task.cost={self.cfg.cost!r} is not one of {', '.join(COSTS)}")
        if self.cfg.precision not in PRECISIONS:
            raise ConfigError(f"task.precision={self.cfg.precision!r} is not one of "
                              f"{', '.join(PRECISIONS)}")
        self.precision = ""  # what the loaded model runs in (worker side, set by load_model)
        if self.cfg.on_duplicate_id not in ON_DUPLICATE:
            raise ConfigError(f"task.on_duplicate_id={self.cfg.on_duplicate_id!r} is not one of "
                              f"{', '.join(ON_DUPLICATE)}")
        self.default_batch_size = self.cfg.default_batch_size
        self.on_duplicate_id = self.cfg.on_duplicate_id

    # ---- controller ----------------------------------------------------------------------
    def check(self, backends: frozenset[str]) -> None:
        path = Path(self.cfg.input)
        check_input_path("task.input", path,
                         f"point it at a {'/'.join(SUFFIXES)} file or a folder of them")
        if path.is_file() and path.suffix.lower() not in SUFFIXES:
            raise ConfigError(f"task.input={self.cfg.input!r}: {path.suffix!r} is not one of "
                              f"{', '.join(SUFFIXES)}")

    def _files(self) -> list[tuple[Path, str, str]]:
        """(path, id prefix, kind): kind is "" for a regular file, else what it is (``a
        FIFO``): such an entry is never opened (a FIFO blocks, /dev/zero never ends)."""
        root = Path(self.cfg.input)
        if root.is_file():
            return [(root, "", "")]
        found = []
        for p in sorted(root.rglob("*")):
            if p.suffix.lower() not in SUFFIXES:
                continue
            try:
                kind = file_kind(p.stat().st_mode)
            except OSError:
                continue  # a dangling link: nothing to read
            if kind != "a folder":
                found.append((p, p.relative_to(root).as_posix() + ":", kind))
        return found

    def token_counter(self) -> TokenCounter | None:
        """The first model's tokenizer, when its files are here (else costs stay characters)."""
        for rung in self.model_chain("cpu"):
            folder = _tokenizer_folder(rung.source) if rung.available else None
            if folder is None:
                continue
            try:
                return TokenCounter(folder)
            except Exception as exc:  # a cost estimate must never stop a run
                log.warning("embed: cannot count tokens with %s (%s); item costs are characters",
                            folder, one_line(exc, 200))
                return None
        return None

    def discover(self) -> Iterator[Item | BadItem]:
        """Items in input order; cost = tokens (task.cost=tokens, counted 1,024 items or 8 MB
        of text at a time, each on its first COUNT_CHARS characters)."""
        counter = self.token_counter() if self.cfg.cost == "tokens" else None
        if counter is None:
            yield from self._discover_chars()
            return
        chunk: list[Item | BadItem] = []
        chars = 0
        for found in self._discover_chars():
            chunk.append(found)
            chars += len(found.payload) if isinstance(found, Item) else 0
            if len(chunk) == COUNT_ITEMS or chars >= COUNT_BATCH_CHARS:
                yield from self._costed(chunk, counter)
                chunk, chars = [], 0
        yield from self._costed(chunk, counter)

    @staticmethod
    def _costed(chunk: list[Item | BadItem], counter: TokenCounter) -> list[Item | BadItem]:
        items = [o for o in chunk if isinstance(o, Item)]
        tokens = iter(counter([o.payload for o in items]) if items else [])
        return [replace(o, cost=float(next(tokens))) if isinstance(o, Item) else o for o in chunk]

    def _discover_chars(self) -> Iterator[Item | BadItem]:
        cfg = self.cfg
        for path, prefix, kind in self._files():
            shown = prefix[:-1] or path.name
            if kind:  # never opened
                yield BadItem(shown, f"{shown}: not a regular file ({kind}); remove it or "
                                     f"replace it with a file", where=shown,
                              fingerprint=names.text_fingerprint(f"\0bad\0{kind}"))
                continue
            unit = "row" if path.suffix.lower() in (".csv", ".parquet") else "line"
            reader = READERS[path.suffix.lower()]
            for n, ident, text, error in reader(path, cfg.text_field, cfg.id_field,
                                                cfg.max_item_bytes):
                where = f"{shown} {unit} {n}"
                item_id, id_error = self._item_id(prefix, n, ident, where)
                error = error or id_error or _text_error(text, cfg.text_field)
                if error:
                    yield BadItem(item_id, f"item {item_id} ({where}): {error}",
                                  fingerprint=names.text_fingerprint("\0bad\0" + error),
                                  where=where)
                else:
                    yield Item(item_id, float(len(text)), text,
                               fingerprint=names.text_fingerprint(text), where=where)

    def _item_id(self, prefix: str, n: int, ident: Any, where: str) -> tuple[str, str | None]:
        """The id as the input spells it: a string, or an integer's digits; line/row number
        when task.id_field is null. Anything else is bad input (error, placeholder id)."""
        if not self.cfg.id_field:
            return prefix + str(n), None
        if isinstance(ident, str) and ident != "" and names.is_unicode(ident):
            return prefix + ident, None
        if isinstance(ident, int) and not isinstance(ident, bool):
            return prefix + str(ident), None
        kind = ("missing" if ident is _MISSING else "empty" if ident == "" else
                "text with an unpaired surrogate" if isinstance(ident, str) else
                "null" if ident is None else f"a {_kind(ident)}")
        return (f"<no usable id: {where}>",
                f"id field {self.cfg.id_field!r} is {kind}, not a string or an integer; "
                f"give every line its own id")

    def model_chain(self, backend: str) -> list[ModelRung]:
        rungs = []
        for name in self.cfg.models:
            if Path(name).expanduser().is_dir():
                rungs.append(ModelRung(name, str(Path(name).expanduser()), True, "local path"))
            elif (bundled := _bundled_path(name)) is not None:
                rungs.append(ModelRung(name, str(bundled), True, "bundled offline package"))
            elif _hf_cached(name):
                rungs.append(ModelRung(name, name, True, "Hugging Face cache"))
            elif self.cfg.allow_download:
                rungs.append(ModelRung(name, name, True, "will be downloaded"))
            else:
                rungs.append(ModelRung(name, name, False,
                                       "not a local path, not bundled, not in the Hugging Face "
                                       "cache (set task.allow_download=true to fetch it)"))
        return rungs

    def worker_env(self) -> dict[str, str]:
        return {} if self.cfg.allow_download else {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def finalize(self, ctx: FinalizeContext) -> dict[str, Any]:
        import pyarrow.parquet as pq

        out_dir = ctx.run_dir / self.output_dir
        referenced: dict[str, int] = {}
        models: dict[str, int] = {}
        for _id, output, model in ctx.done:
            referenced[output] = referenced.get(output, 0) + 1
            models[model] = models.get(model, 0) + 1
        shards, dim = [], None
        precisions: dict[str, int] = {}
        stale = {rel for rel in referenced
                 if pq.read_metadata(ctx.run_dir / rel).num_rows != referenced[rel]}
        if stale:  # rows of items made again since (input changed) or gone from the input
            self._prune(ctx, stale)
        for rel in sorted(referenced):
            meta = pq.read_metadata(ctx.run_dir / rel)
            shards.append({"path": rel, "rows": meta.num_rows})
            for name, rows in _precisions(ctx.run_dir / rel).items():
                precisions[name] = precisions.get(name, 0) + rows
            if dim is None:
                vec = pq.read_schema(ctx.run_dir / rel).field("vector").type
                dim = getattr(vec, "list_size", None)
        orphans = [p for p in out_dir.glob("part-*.parquet")
                   if str(p.relative_to(ctx.run_dir)) not in referenced] if out_dir.is_dir() else []
        for p in orphans:  # written by a worker that died before reporting: redone elsewhere
            p.unlink()
        manifest = {"shards": shards, "rows": sum(s["rows"] for s in shards), "dim": dim,
                    "models": models, "normalized": self.cfg.normalize,
                    "precisions": precisions,
                    "columns": {"id": "string", "vector": f"fixed_size_list<float32>[{dim}]",
                                "model": "string", "batch_size": "int32", "device": "string",
                                "precision": "string"},
                    "orphans_removed": len(orphans)}
        if shards or out_dir.is_dir():
            atomic_write_json(out_dir / "manifest.json", manifest)
        return {"rows": manifest["rows"], "dim": dim, "shards": len(shards)}

    @staticmethod
    def _prune(ctx: FinalizeContext, stale: set[str]) -> None:
        """Rewrite each shard in ``stale`` with only the rows the journal says it holds."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        keep: dict[str, list[str]] = {rel: [] for rel in stale}
        for item_id, output, _model in ctx.done:
            if output in keep:
                keep[output].append(item_id)
        for rel, ids in keep.items():
            table = pq.read_table(ctx.run_dir / rel)
            table = table.filter(pc.is_in(table["id"], value_set=pa.array(ids, pa.string())))
            with atomic_path(ctx.run_dir / rel) as tmp:
                pq.write_table(table, tmp, use_dictionary=_DICT_COLUMNS)
            log.info("embed: %s rewritten without rows made again or gone from the input "
                     "(%d kept)", rel, table.num_rows)

    # ---- worker --------------------------------------------------------------------------
    def load_model(self, rung: ModelRung, device: str) -> Any:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(rung.source, device=device)
        self.precision = choose_precision(self.cfg.precision, device)
        if self.precision != "fp32":
            import torch

            model.to({"fp16": torch.float16, "bf16": torch.bfloat16}[self.precision])
        log.info("embed: %s runs in %s on %s", rung.name, self.precision, device)
        return model

    def process(self, model: Any, items: Sequence[Item]) -> list[Any]:
        vecs = model.encode([it.payload for it in items], batch_size=len(items),
                            convert_to_numpy=True, normalize_embeddings=self.cfg.normalize,
                            show_progress_bar=False)
        return list(vecs)

    def write(self, items: Sequence[Item], results: Sequence[Any], ctx: WriteContext) -> list[str]:
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        mat = np.asarray(results, dtype=np.float32)
        dim = mat.shape[1]
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1)), dim)
        table = pa.table({"id": pa.array([it.id for it in items], pa.string()),
                          "vector": vectors,
                          # provenance: the OOM ladder's rung this row came from
                          "model": pa.array([ctx.model] * len(items), pa.string()),
                          "batch_size": pa.array([ctx.batch_size] * len(items), pa.int32()),
                          "device": pa.array([ctx.device] * len(items), pa.string()),
                          "precision": pa.array([self.precision or "fp32"] * len(items),
                                                pa.string())})
        name = f"part-{ctx.batch_no:05d}" + ("" if ctx.whole else f"-{ctx.offset:04d}")
        final = ctx.run_dir / self.output_dir / f"{name}.parquet"
        with atomic_path(final) as tmp:
            # Dictionary pages only where values repeat: tried on the float vectors they cost
            # 3x the CPU of the whole write and made the shard 45% larger.
            pq.write_table(table, tmp, use_dictionary=_DICT_COLUMNS)
        rel = f"{self.output_dir}/{name}.parquet"
        return [rel] * len(items)
