"""Checkpoints: written atomically, read with ``weights_only=True``, every failure a one-line error."""

from __future__ import annotations

import logging
import os
import pickle
import re
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

import torch

from robust_sparse.errors import CheckpointError, ConfigError
from robust_sparse.files.rundir import os_error

log = logging.getLogger(__name__)

FORMAT = "robust-sparse/1"


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


def check_output_dir(path: str | Path, where: str, hint: str = "choose another path") -> None:
    """An output directory must be a directory or creatable as one: no existing file at it or above it.

    Checked before any work: otherwise ``mkdir`` fails with a traceback after data and model were loaded.
    """
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"{where}: {existing} is an existing file, not a directory; {hint}")


def remove_temporaries(directory: str | Path) -> None:
    """Delete the ``.NAME.*.tmp`` files a killed :func:`atomic_open` left in ``directory``.

    Only for a directory one process owns (a run directory): another writer's file in flight would go too.
    """
    for leftover in Path(directory).glob(".*.tmp"):
        leftover.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted write", leftover)


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Write atomically (see :func:`atomic_open`): a run killed mid-write leaves the previous checkpoint intact."""
    with atomic_open(path, "wb") as stream:
        torch.save({"format": FORMAT, **payload}, stream)


def safe_load(path: str | Path, what: str = "checkpoint", map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; every failure one :class:`CheckpointError` line naming ``what``.

    torch's own messages run to several hundred characters and, for a file with pickled objects, advise
    ``weights_only=False``: the wrong advice for a file we did not write. Ours say what is wrong with the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        with warnings.catch_warnings(record=True) as caught:  # e.g. "Detected pickle protocol 4": not one line
            warnings.simplefilter("always")
            payload = torch.load(path, map_location=map_location, weights_only=True)
        for warning in caught:
            log.debug("loading %s: %s", path, warning.message)
        return payload
    except PermissionError:
        raise CheckpointError(f"{what} {path} cannot be read: permission denied") from None
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if found:  # a well-formed file that pickles code or classes: refused, never executed
            raise CheckpointError(
                f"{what} {path} is not a safe checkpoint (not loadable safely): it pickles the Python object "
                f"{found.group(1)}, and only tensors and plain containers are loaded, so pickled code never "
                "runs") from None
        raise CheckpointError(f"{what} {path} is corrupted or not loadable safely: not a torch.save file of "
                              "tensors and plain containers (random bytes, or a plain pickle)") from None
    except (EOFError, OSError, RuntimeError) as error:  # EOF, "[Errno 22]", miniz "central directory", ...
        text = str(error).strip()
        if isinstance(error, RuntimeError) and not re.search(r"zip archive|EOF|corrupt", text, re.IGNORECASE):
            first = text.splitlines()[0] if text else type(error).__name__
            raise CheckpointError(f"{what} {path} cannot be loaded: {first[:160]}") from None
        detail = "empty" if path.stat().st_size == 0 else "truncated or damaged"
        raise CheckpointError(f"{what} {path} is corrupted: {detail}, not a complete torch file "
                              f"({type(error).__name__}); copy or write it again") from None
    except Exception as error:  # anything else torch's unpickler raises on bytes it does not understand
        raise CheckpointError(f"{what} {path} is corrupted or not loadable safely: not a torch file "
                              f"({type(error).__name__})") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a robust-sparse checkpoint. Only tensors and plain containers are accepted (``weights_only``)."""
    path = Path(path)
    payload = safe_load(path, "checkpoint", map_location)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a robust-sparse checkpoint (format {FORMAT!r} expected)")
    return payload
