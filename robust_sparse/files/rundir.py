"""Directories the toolkit writes into: owned, locked while in use, checked for writability before any work.

* **Owned.** ``train``, ``sweep``, ``eval`` (its results store), ``export`` and ``report`` write only into a
  directory that is absent, empty, or already theirs. Theirs means: it holds the marker file :data:`MARKER`
  (``{"kind": "train"}``, ...), written before anything else; a directory written before markers existed is
  recognised by the content of what the toolkit wrote there (a robust-sparse checkpoint, a results store's
  header), never by file names alone, and gets its marker on first use.
* **Locked.** While a command writes, it holds an advisory ``flock`` on :data:`LOCK` inside the directory, with
  its pid and host written in it. The kernel drops the lock when the process dies, so a ``kill -9`` leaves no
  stale lock; a second writer is refused in one line naming the holder.
* **Writable.** :func:`check_writable` creates and removes a probe file where the output will go, so a read-only
  or unwritable location fails in one line before an hour of work, not after it.

Every refusal is an :class:`~robust_sparse.errors.OutputError` (one line, exit code 2).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Iterator

from robust_sparse.errors import OutputError
from robust_sparse.files.atomic import describe, os_error, write_atomic  # noqa: F401 (describe: re-exported)

log = logging.getLogger(__name__)

MARKER = ".robust-sparse-run"
LOCK = ".robust-sparse.lock"
#: Set by a sweep in its children's environment: the child dies with that process (see :func:`die_with_parent`).
PARENT_ENV = "ROBUST_SPARSE_DIE_WITH"


class Kind(str, Enum):
    TRAIN = "train"
    SWEEP = "sweep"
    EVAL = "eval"
    EXPORT = "export"
    REPORT = "report"


# ----------------------------------------------------------------------------------------------------------
# ownership


def marker_kind(directory: Path) -> str | None:
    """The kind recorded in ``directory``'s marker; None without one (an unreadable marker is nobody's)."""
    try:
        data = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    kind = data.get("kind") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


def _is_checkpoint(path: Path) -> bool:
    """A robust-sparse checkpoint (a torch zip whose pickle holds the format tag), read without unpickling."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
            return bool(pickles) and b"robust-sparse/1" in archive.read(pickles[0])
    except (OSError, zipfile.BadZipFile, KeyError, ValueError):
        return False


def _starts_with(path: Path, *prefixes: str) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as stream:
            head = stream.read(200)
    except OSError:
        return False
    return head.startswith(prefixes)


def _legacy_kind(directory: Path) -> Kind | None:
    """What an unmarked directory holds, by the content the toolkit wrote there before markers existed."""
    if (directory / "config.yaml").is_file() and any(_is_checkpoint(directory / name)
                                                      for name in ("last.pt", "best.pt")):
        return Kind.TRAIN
    if (directory / "sweep.yaml").is_file() and _starts_with(directory / "runs.csv", "run_id,"):
        return Kind.SWEEP
    if (_starts_with(directory / "results.csv", "timestamp,model,")
            or _starts_with(directory / "results.json", "[\n {\n  \"timestamp\"")
            or (_contents(directory) == ["flags"] and (directory / "flags").is_dir()
                and all(path.suffix == ".pt" for path in (directory / "flags").iterdir()))):
        return Kind.EVAL  # (a store killed before its first row holds only per-point flags)
    if _starts_with(directory / "export.json", "{\n  \"checkpoint\""):
        return Kind.EXPORT
    if (_starts_with(directory / "report.md", "# robust-sparse evaluation report", "# Sweep report:")
            or _starts_with(directory / "paired.md", "# Paired analysis of")):
        return Kind.REPORT
    return None


def owner(directory: str | Path) -> Kind | str | None:
    """The kind that owns ``directory`` (a marker's unknown kind as its text); None if no robust-sparse one."""
    directory = Path(directory)
    recorded = marker_kind(directory)
    if recorded is not None:
        return Kind(recorded) if recorded in Kind._value2member_map_ else recorded
    return _legacy_kind(directory) if directory.is_dir() else None


def _contents(directory: Path) -> list[str]:
    """What ``directory`` holds besides the lock and the leftovers of a marker write a kill interrupted."""
    ours = (f".{MARKER}.", ".robust-sparse-probe.")  # atomic_open's temporaries: .NAME.XXXX.tmp
    return sorted(entry.name for entry in directory.iterdir()
                  if entry.name != LOCK and not (entry.name.startswith(ours) and entry.name.endswith(".tmp")))


def check_owned(directory: str | Path, kind: Kind, where: str) -> None:
    """Refuse (one line naming ``directory``) unless it is absent, empty or already ``kind``'s; then check that
    it can be written. Reads only: nothing is created."""
    if isinstance(directory, str) and not directory.strip():
        raise OutputError(f"{where}: must not be empty")
    directory = Path(directory)
    existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise OutputError(f"{where} {directory}: {existing} is an existing file, not a directory: "
                          f"{describe(OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)))}")
    if directory.is_dir():
        try:
            contents = _contents(directory)
        except OSError as error:
            raise os_error(directory, error, f"{where}: cannot read") from None
        found = owner(directory)
        if contents and found is not kind:
            if found is not None:
                label = found.value if isinstance(found, Kind) else found
                raise OutputError(f"{where} {directory}: belongs to robust-sparse {label}, not {kind.value}; "
                                  "nothing was written: choose another directory")
            shown = ", ".join(contents[:4]) + (f" and {len(contents) - 4} more" if len(contents) > 4 else "")
            raise OutputError(f"{where} {directory}: exists and is not a robust-sparse {kind.value} directory "
                              f"(it holds {shown}); nothing was written: choose an empty or new directory")
    check_writable(directory, where)


def claim(directory: str | Path, kind: Kind, where: str, *, adopt: bool = False) -> Path:
    """:func:`check_owned` (skipped with ``adopt``: a directory inside one the caller already owns), then the
    directory created and its marker written, before anything else goes in."""
    directory = Path(directory)
    if not adopt:
        check_owned(directory, kind, where)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise os_error(getattr(error, "filename", None) or directory, error) from None
    if marker_kind(directory) != kind.value:
        try:
            write_atomic(directory / MARKER, json.dumps({"kind": kind.value}) + "\n")
        except OutputError:
            # Two processes claiming one new directory both write the marker; the one that wins the lock clears
            # the other's temporary file (run_record.prepare_run_dir), so the loser's write fails. The marker it
            # wanted is there: go on, and let the lock refuse it in its own words.
            if marker_kind(directory) != kind.value:
                raise
    return directory


# ----------------------------------------------------------------------------------------------------------
# locks


#: flock's errors on a file system that cannot lock (as opposed to a lock another process holds)
UNLOCKABLE = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


@contextmanager
def locked(directory: str | Path, kind: Kind, where: str, *, adopt: bool = False) -> Iterator[Path]:
    """Claim ``directory`` for ``kind`` and hold its lock for the block; a second writer is refused in one line
    naming the holder's pid and host. The kernel releases the lock when this process ends, however it ends."""
    import fcntl

    directory = claim(directory, kind, where, adopt=adopt)
    path = directory / LOCK
    try:
        stream = open(path, "a+")
    except OSError as error:
        raise os_error(path, error) from None
    try:
        try:
            fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(stream, directory, kind, where) from None
        except OSError as error:
            if error.errno not in UNLOCKABLE:
                raise os_error(path, error) from None
            # a file system without flock (Lustre mounted without it, NFS without lockd: common where clusters
            # write): the work goes on, unguarded against a second writer, and says so
            log.warning("%s: this file system does not support locks (%s); %s is not guarded against a second "
                        "writer", path, describe(error), directory)
            yield directory
            return
        try:
            stream.seek(0)
            stream.truncate()
            stream.write(f"{os.getpid()} {socket.gethostname()} {kind.value}\n")
            stream.flush()
        except OSError as error:  # a full disk: the lock holds all the same, only the holder's name is missing
            log.debug("could not record the lock holder in %s: %s", path, error)
        yield directory
    finally:
        stream.close()  # closing the descriptor releases the lock


def check_unlocked(directory: str | Path, kind: Kind, where: str) -> None:
    """Refuse, in :func:`locked`'s words, a directory whose lock another process holds; takes no lock itself.
    Under torchrun every rank checks this before the process group forms and only the first rank then takes
    the lock: a directory in use stops every rank at once, instead of leaving the others waiting for the first
    until the group's timeout. (Not for a process that holds the lock: it would refuse itself.)"""
    import fcntl

    try:
        stream = open(Path(directory) / LOCK)
    except OSError:  # no lock file yet (or an unreadable one, which locked() reports)
        return
    with stream:
        try:
            # shared: the ranks' checks do not exclude one another, only a holder's exclusive lock fails them
            fcntl.flock(stream, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(stream, Path(directory), kind, where) from None
        except OSError:  # a file system without locks: locked() says so
            return


def _in_use(stream, directory: Path, kind: Kind, where: str) -> OutputError:
    """The refusal of a directory whose lock another process holds, naming the holder (from the lock file)."""
    holder: list[str] = []
    for _ in range(20):  # the holder writes its name just after taking the lock: give it a moment
        stream.seek(0)
        holder = stream.read().split()
        if holder:
            break
        time.sleep(0.05)
    who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
    return OutputError(f"{where} {directory}: in use by {who} (a robust-sparse "
                       f"{holder[2] if len(holder) >= 3 else kind.value}); wait for it to finish, or "
                       "choose another directory")


# ----------------------------------------------------------------------------------------------------------
# writability


def check_writable(path: str | Path, where: str, named: str | Path | None = None) -> None:
    """Create and remove a probe file in ``path``, or in its nearest existing ancestor when it does not exist
    yet; any failure (permission, read-only, not a directory) is one line naming the path (``named``, where
    that is what the user gave) and the errno."""
    path = Path(path)
    named = path if named is None else named
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise OutputError(f"{where} {named}: {existing} is not a directory: "
                          f"{describe(OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)))}")
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".robust-sparse-probe.", suffix=".tmp")
    except OSError as error:
        raise OutputError(f"{where} {named}: cannot write into {existing}: {describe(error)}") from None
    os.close(handle)
    os.unlink(probe)


def check_output_file(path: str | Path, where: str) -> None:
    """An output file: not a directory, its folder exists and can be written."""
    if isinstance(path, str) and not path.strip():
        raise OutputError(f"{where}: must not be empty")
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{where} {path}: is a directory; give a file name, e.g. {path / 'result.json'}")
    if not path.parent.is_dir():
        raise OutputError(f"{where} {path}: the folder {path.parent} does not exist")
    check_writable(path.parent, where, named=path)
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{where} {path}: cannot write: {describe(OSError(errno.EACCES, os.strerror(errno.EACCES)))}")


# ----------------------------------------------------------------------------------------------------------
# children that die with their parent


def die_with_parent() -> None:
    """In a child a sweep started (``$ROBUST_SPARSE_DIE_WITH`` = the sweep's pid): ask the kernel for SIGTERM
    when the parent dies (Linux ``PR_SET_PDEATHSIG``), and exit at once if it already has. Set here, in the
    child's own main thread, rather than in a ``preexec_fn``, which is unsafe in the sweep's threaded parent."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError) as error:
        log.debug("prctl(PR_SET_PDEATHSIG) unavailable: %s", error)
    if str(os.getppid()) != parent:  # the sweep died before the request was in place
        os._exit(143)


def report_dir(first: str | Path) -> Path:
    """Where ``report`` writes by default: a new folder beside the first directory it reads (beside the run, for
    a run's own ``eval`` store), never inside a run, sweep or store."""
    base = Path(first).absolute()
    if base.name == "eval" and owner(base.parent) is Kind.TRAIN:
        base = base.parent
    return base.parent / f"{base.name}-report"
