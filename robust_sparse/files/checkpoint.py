"""Checkpoints: written atomically, read with ``weights_only=True``, every failure a one-line error."""

from __future__ import annotations

import logging
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from robust_sparse.errors import CheckpointError, ConfigError
# re-exported: callers write their files through the checkpoint module's names as well
from robust_sparse.files.atomic import atomic_open

log = logging.getLogger(__name__)

FORMAT = "robust-sparse/1"


def check_output_dir(path: str | Path, where: str, hint: str = "choose another path") -> None:
    """An output directory must be a directory or creatable as one: no existing file at it or above it.

    Checked before any work: otherwise ``mkdir`` fails with a traceback after data and model were loaded.
    """
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"{where}: {existing} is an existing file, not a directory; {hint}")


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
