"""Files the pipeline writes: atomically (the one place in this package that does it), and caches that cannot run code.

    with atomic_open(path) as f: f.write(...)     # a unique temp file beside path, fsync, os.replace; removed on error
    atomic_write(path, "text or bytes")
    save_cache(path, obj); obj = load_cache(path)   # JSON + numpy arrays in an .npz, read with allow_pickle=False

A reader never sees half a file: the data goes to a temp file with a unique name in the same directory (so two
writers never share one), is flushed to disk, and only then takes the final name. A failure removes the temp file.
Caches are plain data (JSON and arrays): a shared data folder cannot smuggle in code the way a pickle can.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from dataset_curation.stages import StageStats


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb"):
    """Open a temp file beside `path` for writing; on a clean exit fsync it and rename it to `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write bytes (or UTF-8 text) to path atomically."""
    with atomic_open(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def atomic_json(path: str | Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Caches: nested lists/dicts/str/numbers, StageStats and numpy arrays


def save_cache(path: str | Path, obj) -> None:
    """Store obj as one .npz: arrays as arrays, everything else as JSON (lone surrogates survive as \\u escapes)."""
    arrays: dict[str, np.ndarray] = {}

    def encode(o):
        if isinstance(o, np.ndarray):
            if o.dtype == object:
                raise TypeError("object arrays cannot be cached safely; use a numeric dtype")
            name = f"a{len(arrays)}"
            arrays[name] = o
            return {"__array__": name}
        if isinstance(o, StageStats):
            return {"__stats__": dataclasses.asdict(o)}
        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.floating):
            return float(o)
        raise TypeError(f"cannot cache a {type(o).__name__}")

    text = json.dumps(obj, default=encode)  # ensure_ascii (the default) keeps it valid UTF-8 bytes
    buf = io.BytesIO()
    np.savez(buf, __json__=np.frombuffer(text.encode("ascii"), dtype=np.uint8), **arrays)
    atomic_write(path, buf.getvalue())


def load_cache(path: str | Path):
    """The object save_cache stored (tuples come back as lists)."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}

    def decode(d: dict):
        if "__array__" in d and len(d) == 1:
            return arrays[d["__array__"]]
        if "__stats__" in d and len(d) == 1:
            return StageStats(**d["__stats__"])
        return d

    return json.loads(arrays.pop("__json__").tobytes().decode("ascii"), object_hook=decode)
