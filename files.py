"""Writing the project's output files: checked before the work, written whole or not at all.

Every command that writes a file (profile.py --out, the benchmarks' --out, conformance.py's events, vectors
and random models) checks the path with `check_output` before it starts, and writes with `write_atomic`, so
that a bad path fails in one line up front and an interrupted run never leaves half a file behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def check_output(path, what: str = "output") -> Path:
    """Before any work: `path` names a file this process can create or replace (an empty name, a folder, a
    missing or read-only folder, /proc or /sys fail here, not after an hour of work)."""
    if not str(path).strip():
        raise ValueError(f"{what}: the output file name is empty")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what}: {path} is a folder; give a file name")
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"{what}: cannot write {path}: folder {folder} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".check"):
            pass
    except OSError as e:
        raise ValueError(f"{what}: cannot write {path} ({e.strerror}); choose another place") from None
    return path


def write_atomic(path, text: str):
    """Write `text` to a temporary file beside `path`, then rename it over `path`: an interrupted write
    leaves the old file (or none), never half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
