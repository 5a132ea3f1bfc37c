"""File writes that never leave a partial file behind."""

from __future__ import annotations

import os
import tempfile

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write ``path`` so that readers see the old file or the new one, never a partial write:
    ``write`` is the text to store, or a callable that writes the temporary file it is given;
    then fsync and rename over ``path``. The temporary file sits in the same directory (a rename
    is atomic only within one file system) and is removed if anything fails."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        if isinstance(write, str):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(write)
        else:
            write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
