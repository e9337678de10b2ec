"""Outputs written whole or not at all, and a full disk named in one line.

Every file and folder the library leaves for a person or a later run (checkpoints, the adapter, a merged
model folder, the GGUF and its Modelfile, reports) is written under a temporary name beside its target and
renamed over it when complete. A kill at any moment leaves the previous output or the new one under the
target's name, never a partial one. A folder that replaces an older one is swapped in two renames (the old
one aside, the new one in); a kill between them leaves the target's name empty for that moment, with both
complete copies beside it.

When a write fails because the disk is full, a quota is reached or the folder is read-only, the temporary
output is removed and `WriteError` names the path and the cause: the library's tools print it as their one
`error: ...` line.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# What a full or closed disk answers: the run stops naming the path instead of a traceback from deep inside.
_STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


class WriteError(OSError):
    """An output could not be written (disk full, quota, read-only or forbidden folder); names the path."""


def _storage_errno(error: Exception) -> int | None:
    """The errno of a storage error: an OSError's own, or the one that safetensors (Rust) writes into its
    message as "(os error 28)"; None for anything else."""
    code = error.errno if isinstance(error, OSError) else None
    if code is None and (found := re.search(r"\(os error (\d+)\)", str(error))):
        code = int(found.group(1))
    return code if code in _STORAGE_ERRORS else None


@contextmanager
def storage_errors_named(path: str | Path) -> Iterator[None]:
    """Within the block, a storage error becomes a WriteError naming `path`."""
    try:
        yield
    except WriteError:
        raise
    except Exception as error:
        code = _storage_errno(error)
        if code is None:
            raise
        raise WriteError(code, f"{path}: cannot write: {os.strerror(code)} [{errno.errorcode[code]}]; nothing "
                               "under that name was changed") from error


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def staged_file(target: str | Path) -> Iterator[Path]:
    """A temporary path beside `target` to write; renamed over `target` when the block ends without error,
    removed when it raises."""
    target = Path(target)
    staging = target.with_name(f".{target.name}.{os.getpid()}.partial")  # two writers never share one
    try:
        with storage_errors_named(target):
            yield staging
            _fsync(staging)
            os.replace(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def write_text(target: str | Path, text: str) -> Path:
    """Write a text file whole or not at all (see the module docstring)."""
    target = Path(target)
    with staged_file(target) as staging:
        staging.write_text(text, encoding="utf-8")
    return target


@contextmanager
def staged_folder(target: str | Path) -> Iterator[Path]:
    """An empty temporary folder beside `target` to fill; swapped in for `target` (replacing an older one)
    when the block ends without error, removed when it raises."""
    target = Path(target)
    staging = target.with_name(f".{target.name}.tmp")
    previous = target.with_name(f".{target.name}.old")
    shutil.rmtree(staging, ignore_errors=True)  # left by an earlier kill
    try:
        with storage_errors_named(target):
            staging.mkdir(parents=True)
            yield staging
            for path in staging.rglob("*"):
                if path.is_file():
                    _fsync(path)
            if target.exists():
                shutil.rmtree(previous, ignore_errors=True)
                os.replace(target, previous)
            os.replace(staging, target)
            shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
