"""Writing files atomically: a reader, or a process killed at any moment, sees the old file or the
new one, never half of one (temporary file beside the target, fsync, rename, fsync the folder)."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
import warnings
from typing import BinaryIO, Callable


TEMP_PREFIX, TEMP_SUFFIX = ".tmp-", ".tmp"  # write_atomic's temporary files (tests look for *.tmp leftovers)


def write_atomic(path: str, write: Callable[[BinaryIO], object]) -> str:
    """Call ``write(file)`` on a temporary file in path's folder, then rename it over path."""
    path = os.fspath(path)
    # the folder as written, not abspath's: "new/../x.png" resolves through new/, which must then exist
    folder = os.path.dirname(path) or os.curdir
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; results are for reading
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = _write_error_in(exc) if isinstance(exc, Exception) else None  # (Ctrl-C stays Ctrl-C)
        if cause is not None and not cause.filename:
            # f.write's own error names no file, and torch.save's zip writer wraps it in a RuntimeError
            # ("unexpected pos"): the caller is told which file could not be written, and why
            raise OSError(cause.errno, cause.strerror, path) from exc
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)
    return path


def remove_temporaries(folder: str) -> None:
    """Delete the temporary files of writes a SIGKILL interrupted in folder (write_atomic's cleanup never ran):
    a checkpoint's size each.  Only for a folder no other process is writing to."""
    for name in os.listdir(folder):
        if name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX):
            os.remove(os.path.join(folder, name))


@contextlib.contextmanager
def exclusive_lock(path: str, busy: str, *, wait: bool = False, on_wait: Callable[[], None] | None = None):
    """An exclusive flock on path (a directory, or a file made if missing) for the block: ValueError(busy) when
    another process holds it (wait=True: call on_wait, then wait for it).  Where flock itself fails (some network
    filesystems) the block runs unlocked, with a warning: two processes in one directory go unnoticed there."""
    import fcntl

    fd = os.open(path, os.O_RDONLY) if os.path.isdir(path) else os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise ValueError(busy) from None
            if on_wait is not None:  # say why this process stops here (the holder may be a stopped job)
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            warnings.warn(f"cannot lock {path!r} ({e.strerror or e}; a filesystem without flock, or NFS, which "
                          "locks only files open for writing); nothing stops another process from writing there at "
                          "the same time", stacklevel=3)
        yield
    finally:
        os.close(fd)  # which releases the lock


# what a full disk, a quota, a file-size limit (ulimit -f), a read-only or unwritable folder raise: the command
# says so in one line
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def _write_error_in(exc: BaseException) -> OSError | None:
    """The OSError of WRITE_ERRNOS that exc is, or that it was raised from or while handling."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def write_error_text(e: BaseException) -> str | None:
    """"cannot write PATH: REASON" for an OSError of WRITE_ERRNOS, else None (a bug keeps its traceback)."""
    if not isinstance(e, OSError) or e.errno not in WRITE_ERRNOS:
        return None
    where = f" {e.filename!r}" if e.filename else ""
    return f"cannot write{where}: {e.strerror or e}"


def write_bytes(path: str, data: bytes) -> str:
    return write_atomic(path, lambda f: f.write(data))


def write_json(path: str, obj, *, indent: int = 2, default: Callable | None = None) -> str:
    return write_bytes(path, (json.dumps(obj, indent=indent, default=default) + "\n").encode())
