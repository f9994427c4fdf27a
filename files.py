"""Writing the project's output files: checked before the work, written whole or not at all.

Every command that writes a file (profile.py --out, the benchmarks' --out, conformance.py's events, vectors
and random models) checks the path with `check_output` before it starts, and writes with `write_atomic`, so
that a bad path fails in one line up front, a file that is not ours (a device, a link, the run's own input)
is never replaced, and an interrupted run never leaves half a file behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json")


def model_files(folder) -> list[Path]:
    """The files of a model folder that a run reads (for `check_output`'s inputs): config, weights, tokenizer.
    folder None: the embedded default model's folder in the cache (not converted here)."""
    if folder is None:
        from convert import DEFAULT_NAME, cache_root

        folder = cache_root() / DEFAULT_NAME
    folder = Path(folder)
    return [folder / name for name in MODEL_FILES] + sorted(folder.glob("*.safetensors"))


def check_output(path, what: str = "output", *, inputs=()) -> Path:
    """The one output rule, checked before any work: `path` names a regular file this process may create or
    replace, and nothing else. Refused, in one line that says what to change: an empty name; a folder; a device,
    pipe or socket (a write would replace the node with a file); a symbolic link (it would be replaced by a file,
    not written through); one of the run's own `inputs` (the files it reads: prompts, profile, model files); a
    missing or read-only folder, /proc or /sys."""
    if not str(path).strip():
        raise ValueError(f"{what}: the output file name is empty")
    path = Path(path)
    if path.is_symlink():
        raise ValueError(f"{what}: {path} is a symbolic link, which the write would replace with a file; give the "
                         f"file it points to ({path.resolve()}) or another name")
    if path.is_dir():
        raise ValueError(f"{what}: {path} is a folder; give a file name")
    if path.exists() and not path.is_file():
        raise ValueError(f"{what}: {path} is not a regular file (a device, a pipe or a socket), which the write "
                         f"would replace; give a file name")
    for source in inputs:
        if source is not None and Path(source).resolve() == path.resolve():
            raise ValueError(f"{what}: {path} is also an input of this run, which the write would replace; choose "
                             f"another name")
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"{what}: cannot write {path}: folder {folder} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".check"):
            pass
    except OSError as e:
        raise ValueError(f"{what}: cannot write {path} ({e.strerror}); choose another place") from None
    return path


def write_atomic(path, text):
    """Write `text` (a str, or an iterable of str chunks written one by one, so a long document need not be held
    whole) to a temporary file beside `path`, then rename it over `path`: an interrupted or failed write
    leaves the old file (or none), never half a file. A failed write (a full disk, a quota) is one line that
    says nothing was written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            for chunk in [text] if isinstance(text, str) else text:
                f.write(chunk)
        os.replace(tmp, path)
    except OSError as e:
        raise ValueError(f"cannot write {path} ({e.strerror or e}); nothing was written, "
                         f"{'the old file is kept' if path.exists() else 'no file was left'}: free space or "
                         f"choose another place") from None
    finally:
        tmp.unlink(missing_ok=True)
