"""Atomic file output, the project's one mechanism: write a temporary file beside the
target, fsync it, then `os.replace` it over the target.

`os.replace` within one folder is atomic, so readers (and a re-run after a crash) see
either the previous file or the complete new one, never a partial file. The fsync before
the rename makes this hold across a power loss too: without it the rename can reach the
disk before the data, leaving a truncated file under the final name.

A leaf module (standard library + torch only, nothing from `jit`), so every package of
the project may import it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["OutputWriteError", "atomic_path", "atomic_torch_save", "atomic_write_json", "atomic_write_text",
           "check_writable", "remove_stale_temporaries", "write_error"]

# The names `_create_temporary` gives: `.<target name>.<8 hex digits>.tmp`.
_TEMPORARY_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


class OutputWriteError(OSError):
    """An output cannot be written (full disk, no permission, read-only file system); its
    message is one line naming the path."""

    def __str__(self) -> str:
        return self.strerror


def write_error(err: OSError, path: str | os.PathLike, any_errno: bool = False) -> OSError:
    """`err` as an OutputWriteError naming `path` when the disk is full or `path` is not
    writable (with `any_errno`: whatever the reason); otherwise `err` itself."""
    if isinstance(err, OutputWriteError):
        return err
    if err.errno in _NO_SPACE:
        return OutputWriteError(err.errno, f"no space left on {path}", str(path))
    if err.errno in _NOT_WRITABLE or any_errno:
        reason = os.strerror(err.errno).lower() if err.errno else str(err)
        return OutputWriteError(err.errno, f"cannot write {path}: {reason}", str(path))
    return err


def check_writable(folder: str | os.PathLike) -> None:
    """Create `folder` if needed and a file in it (removed again), or raise OutputWriteError.

    A real write rather than os.access, which says yes to root on a read-only mount.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.unlink(_create_temporary(folder / ".write-check"))
    except OSError as err:
        raise write_error(err, folder, any_errno=True) from err


def _create_temporary(path: Path) -> Path:
    """A new empty file `.<name>.<random>.tmp` beside `path`.

    Created with mode 0o666 filtered by the umask (as `open(path, "w")` would), not
    mkstemp's 0o600, so the final file gets the usual permissions.
    """
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no unused temporary file name beside {str(path)!r}")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that writes killed mid-way (SIGKILL, power loss) left in
    `folder`; only regular files named as this module names them, nothing else.

    Call it where no other process of the run writes to `folder` yet (at the start of a run).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [
        entry for entry in folder.iterdir()
        if _TEMPORARY_NAME.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink()
    ]
    for entry in stale:
        entry.unlink(missing_ok=True)
    return stale


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; best effort (not possible on every platform)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder (created if needed); on success fsync it
    and rename it over `path`, on any exception (BaseException) delete it and re-raise.

    The caller writes to the yielded path and closes it inside the `with` block.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temporary(path)
    except OSError as err:
        raise write_error(err, path) from err
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        mapped = write_error(err, path) if isinstance(err, OSError) else err
        if mapped is not err:
            raise mapped from err
        raise
    _fsync_dir(path.parent)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save(obj, path), atomically."""
    # Through a Python file: a full disk then raises OSError(ENOSPC), not the zip writer's
    # "unexpected pos" RuntimeError.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8",
                      newline: str | None = None) -> None:
    """Path(path).write_text(text), atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding=encoding, newline=newline) as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj, **dump_kwargs) -> None:
    """json.dump(obj, file, **dump_kwargs), atomically (streamed: no full copy in memory)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, **dump_kwargs)
