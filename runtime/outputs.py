"""Atomic writes for small output files (reports, plots): a temporary file in the same folder, then a rename.

A crash or error leaves either the old file or the new one, never half of one, and no temporary behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from onnxcompress.errors import OutputError


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    target = Path(path)
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as error:
        raise OutputError(f"cannot write {target}: {error.strerror or error}") from None
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(temporary, new_file_mode())
        os.replace(temporary, target)
    except BaseException as error:  # Ctrl-C too: never leave the temporary behind
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OutputError(f"cannot write {target}: {error.strerror or error}") from None
        raise
    return target


def remove_tree(path: str | os.PathLike) -> None:
    """Remove a staging folder completely, even when Ctrl-C lands while it is being removed (the interrupt is
    raised once the folder is gone)."""
    try:
        shutil.rmtree(path, ignore_errors=True)
    except KeyboardInterrupt:
        shutil.rmtree(path, ignore_errors=True)
        raise


def new_file_mode() -> int:
    """The mode a plain open() gives a new file: mkstemp's temporaries are 0600, a result should not be."""
    return 0o666 & ~_umask()


def new_folder_mode() -> int:
    """The mode a plain mkdir() gives a new folder (mkdtemp's are 0700)."""
    return 0o777 & ~_umask()


def _umask() -> int:
    umask = os.umask(0o022)  # the umask can only be read by setting it
    os.umask(umask)
    return umask


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())
