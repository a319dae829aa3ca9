"""Scores of candidate models, kept on disk per model + data + settings, so a later search reuses them.

`onnxcompress sensitivity` measures every quantizer unit alone in float; `quantize --max-drop` with the same model,
data, settings and metric then starts from those scores instead of measuring them again. A key digests everything
a score depends on: the model's bytes, the calibration and evaluation data files, the quantization settings, the
metric (a built-in's name, or a `FILE.py:FUNC`'s file contents and function) and onnxcompress's version. When one
of them cannot be named (an in-memory model, an iterator of feeds, a Python callable), nothing is cached. Entries
map the labels of the units left in float to the score; the file is `~/.cache/onnxcompress/scores/<key>.json`
(the folder `ONNXCOMPRESS_SCORE_CACHE` names instead, when set), replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from onnxcompress.errors import ConfigError

VERSION = "1"


#: Environment variable naming the folder instead.
FOLDER_ENV = "ONNXCOMPRESS_SCORE_CACHE"


def cache_folder() -> Path:
    explicit = os.environ.get(FOLDER_ENV)
    return Path(explicit) if explicit else Path.home() / ".cache" / "onnxcompress" / "scores"


class ScoreCache:
    """Scores by the set of units (labels) in float, for one key; `path` None keeps them in memory only."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.scores: dict[frozenset[str], float] = {}
        if path is not None and path.is_file():
            try:
                entries = json.loads(path.read_text())
                self.scores = {frozenset(entry["float"]): float(entry["score"]) for entry in entries}
            except (ValueError, KeyError, TypeError, OSError):
                self.scores = {}  # a damaged cache is only a cache: measure again

    @classmethod
    def keyed(cls, parts: Iterable[str | bytes | Path | None]) -> ScoreCache:
        """The cache of the run these parts describe (files by their bytes); in memory when a part is None."""
        digest = hashlib.sha256(VERSION.encode())
        for part in parts:
            if part is None:
                return cls(None)
            digest.update(b"\0")
            if isinstance(part, Path):
                digest.update(_file_digest(part))
            else:
                digest.update(part if isinstance(part, bytes) else part.encode())
        return cls(cache_folder() / f"{digest.hexdigest()}.json")

    def get(self, labels: frozenset[str]) -> float | None:
        return self.scores.get(labels)

    def put(self, labels: frozenset[str], score: float) -> None:
        self.scores[labels] = score

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entries = [{"float": sorted(labels), "score": score} for labels, score in self.scores.items()]
        fd, name = tempfile.mkstemp(dir=self.path.parent, prefix=".scores.", suffix=".tmp")
        with os.fdopen(fd, "w") as file:
            json.dump(entries, file)
        os.replace(name, self.path)


def _file_digest(path: Path) -> bytes:
    """A file's (or a folder's files') contents, digested in chunks."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    try:
        for file in files:
            digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
            with file.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    except OSError as error:
        raise ConfigError(f"cannot read {path} to key the score cache: {error.strerror or error}") from None
    return digest.digest()
