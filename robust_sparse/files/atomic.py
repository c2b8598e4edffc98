"""Atomic writes (a temporary file renamed over the target) and one-line operating-system errors.

Shared by :mod:`~robust_sparse.files.rundir` (its marker file) and :mod:`~robust_sparse.files.checkpoint`
(checkpoints), so neither imports the other; nothing here imports torch.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

from robust_sparse.errors import OutputError

log = logging.getLogger(__name__)


def describe(error: OSError) -> str:
    """``Read-only file system (EROFS)``: the errno's meaning and its name."""
    name = errno.errorcode.get(error.errno or 0)
    meaning = error.strerror or (os.strerror(error.errno) if error.errno else type(error).__name__)
    return f"{meaning} ({name})" if name else meaning


def os_error(path: str | Path, error: OSError, action: str = "cannot write") -> OutputError:
    """One line for an operating-system error on ``path``: the path and what the errno means."""
    return OutputError(f"{action} {path}: {describe(error)}")


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A stream on a temporary file in ``path``'s directory, fsynced and renamed over ``path`` on success.

    A process killed mid-write leaves the previous file intact (``os.replace`` is atomic on POSIX) and at
    worst a ``.NAME.*.tmp`` leftover, which :func:`remove_temporaries` clears.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise os_error(path, error) from None
    try:
        # mkstemp creates the file 0600; give it the mode open() would (0666 less the umask), so results a
        # group shares stay readable to it
        os.chmod(handle, 0o666 & ~_umask())
        with os.fdopen(handle, mode) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):  # disk full, permission, read-only: one line; the previous file is intact
            raise os_error(path, error) from None
        cause = _stream_write_error(error)
        if cause is not None:
            raise os_error(path, cause) from None
        raise


def _stream_write_error(error: BaseException) -> OSError | None:
    """The OSError under torch.save's ``RuntimeError: [enforce fail at inline_container.cc]``, if that is one.

    torch's zip writer calls the stream's ``write`` from C++, and an OSError raised there (ENOSPC once the
    buffered writer passes a large tensor straight to the disk) comes back as a RuntimeError whose context is
    the OSError. A small file fails in the final flush instead, as a plain OSError; both are the same disk."""
    if not isinstance(error, RuntimeError) or not re.search(r"inline_container|PytorchStreamWriter", str(error)):
        return None
    context = error.__context__
    while context is not None and not isinstance(context, OSError):
        context = context.__context__
    return context


def _umask() -> int:
    """The process's umask. Linux reports it in /proc; elsewhere reading it means setting it and setting it
    straight back, which a thread creating a file at that instant would see (so /proc comes first)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path) as stream:
        stream.write(text)


def save_figure(figure: Any, path: str | Path, **options: Any) -> None:
    """``figure.savefig`` atomically (PNG; ``options`` as savefig's, e.g. dpi)."""
    with atomic_open(path, "wb") as stream:
        figure.savefig(stream, format="png", **options)


def remove_temporaries(directory: str | Path) -> None:
    """Delete the ``.NAME.*.tmp`` files a killed :func:`atomic_open` left in ``directory``.

    Only for a directory one process owns (a run directory): another writer's file in flight would go too.
    """
    for leftover in Path(directory).glob(".*.tmp"):
        leftover.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted write", leftover)
