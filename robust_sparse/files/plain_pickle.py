"""Reading CIFAR's pickled batches without running anything they contain.

The official CIFAR files are Python pickles, and ``pickle.load`` calls whatever a pickle names: a file put
under ``data.root`` could run code before any check. The genuine files (and copies re-pickled by numpy, with
any protocol) hold only dicts, lists, bytes, str, ints and uint8 numpy arrays, and they name exactly these
globals: numpy's ``_reconstruct``/``ndarray``/``dtype`` (``_frombuffer`` from protocol 5) and, for bytes
written by Python 3 at protocol 2, ``_codecs.encode``. :func:`load_plain` maps each of them to a stand-in
that only records its arguments, builds the uint8 arrays from their raw bytes itself, and refuses every other
global, so no numpy or user code ever sees the file's contents.
"""

from __future__ import annotations

import io
import math
import pickle
from typing import Any, BinaryIO

import numpy as np


class NotPlainPickle(pickle.UnpicklingError):
    """The pickle names something other than the plain types of a CIFAR batch; nothing of it was run."""


class _NdarrayClass:
    """What ``numpy.ndarray`` stands for in the file: only ever passed to ``_reconstruct``."""


_NDARRAY = _NdarrayClass()


class _Uint8:
    """``numpy.dtype('u1')`` as the file describes it; its pickled state (byte order '|') is irrelevant."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple):
            raise NotPlainPickle("a dtype with an unexpected state")


class _Array:
    """An ndarray described by ``_reconstruct`` and filled by its state: (version, shape, dtype, fortran, raw)."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise NotPlainPickle("an array with an unexpected state")
        _, shape, dtype, fortran, raw = state
        self.array = _uint8_array(raw, dtype, shape, "F" if fortran else "C")


def _uint8_array(raw: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    if not isinstance(dtype, _Uint8):
        raise NotPlainPickle("an array that is not uint8")
    if not isinstance(raw, (bytes, bytearray)):
        raise NotPlainPickle("an array whose data are not raw bytes")
    if not (isinstance(shape, tuple) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise NotPlainPickle("an array with an unexpected shape")
    if math.prod(shape) != len(raw):
        raise NotPlainPickle(f"an array of shape {shape} with {len(raw)} bytes")
    order = order.decode() if isinstance(order, bytes) else order
    if order not in ("C", "F"):
        raise NotPlainPickle(f"an array with memory order {order!r}")
    return np.frombuffer(bytes(raw), dtype=np.uint8).reshape(shape, order=order).copy()


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _Array:
    if cls is not _NDARRAY:
        raise NotPlainPickle("_reconstruct of something other than numpy.ndarray")
    return _Array()


def _dtype(name: Any, align: Any = False, copy: Any = True) -> _Uint8:
    if name not in ("u1", b"u1", "uint8", b"uint8"):
        raise NotPlainPickle(f"an array of dtype {name!r} (only uint8)")
    return _Uint8()


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    return _uint8_array(buffer, dtype, shape, order)


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode(str, 'latin1')``: how Python 3 writes bytes at protocol 2."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise NotPlainPickle("an unexpected _codecs.encode call")
    return text.encode("latin1")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct, ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): _dtype,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer, ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _encode,
}


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise NotPlainPickle(f"it refers to {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise NotPlainPickle("it holds a persistent reference")


def _resolve(value: Any) -> Any:
    if isinstance(value, _Array):
        if value.array is None:
            raise NotPlainPickle("an array without data")
        return value.array
    if isinstance(value, (_Uint8, _NdarrayClass)):
        raise NotPlainPickle("a bare numpy type")
    if isinstance(value, dict):
        return {key: _resolve(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve(item) for item in value]
    return value


def load_plain(handle: BinaryIO | bytes) -> Any:
    """Unpickle dicts, lists, bytes, str, ints and uint8 arrays (Python 2 strings as bytes, as CIFAR needs).

    Raises :class:`NotPlainPickle` for anything else, before any of it is called.
    """
    if isinstance(handle, bytes):
        handle = io.BytesIO(handle)
    return _resolve(_PlainUnpickler(handle, encoding="bytes").load())
