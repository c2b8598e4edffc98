"""A sparse Conv2d / Linear weight as CSR over (virtual channel, shift), and the autograd function over it.

:class:`SparsePattern` is the structure of one layer's non-zeros, built from its mask once per topology; it
runs the three products of training on the compiled kernels of :mod:`robust_sparse.kernels.numba_csr`:

* forward, ``y = W * x``: the direct sparse convolution;
* the input gradient, ``W^T * dy``: the same kernel over the transposed CSR (flipped kernel, channels
  swapped), which every PGD step needs;
* the weight gradient at the non-zero positions only, ``dW[k] = <dy_o, x_c shifted>``: a sampled product.

Strides go through the polyphase identity: a stride-``s`` convolution of ``x`` equals a stride-1 convolution of
the ``s * s`` phase images ``xp[:, :, ra::s, rb::s]`` (one "virtual channel" per input channel and phase) with
the sub-kernels ``W[:, :, ra::s, rb::s]``, so one stride-1 kernel serves every convolution and its adjoints.
A Linear layer is a 1x1 convolution over a 1x1 image per example.

Values are gathered from the dense weight at every call (``nnz`` floats), so the parameter, its optimizer state
and every checkpoint stay the dense tensor that the mask owner already keeps sparse; only the *positions* are
cached here, and :class:`robust_sparse.kernels.SparseKernels` rebuilds them when the mask owner changes the
topology.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import robust_sparse.kernels.numba_csr as numba_csr

__all__ = ["SparsePattern", "sparse_conv", "set_threads"]

log = logging.getLogger(__name__)

# floats of input rows a tile may touch (all channels' slices): about the 1 MiB L2 per core of this CPU family
_L2_FLOATS = (1024 * 1024) // 4
# maps narrower than this run with the batch innermost (rows of width * batch floats instead of width)
_WIDE = 16


def set_threads(count: int) -> int:
    """Run the kernels on ``count`` threads (at most numba's pool); the count used. Each product follows
    ``torch.get_num_threads()`` by itself; this is for callers that want another count."""
    return numba_csr.set_threads(count)


_first_use = [True]


def _follow_torch_threads() -> None:
    if _first_use[0]:  # numba compiles the kernels at their first call: seconds once, then cached on disk
        _first_use[0] = False
        log.info("sparse kernels: first use in this process; numba loads them, or compiles them if no cached copy "
                 "exists (about 10 s, once)")
    # numba keeps its own count per thread; one call per product keeps it equal to torch's (``set_num_threads``)
    wanted = min(torch.get_num_threads(), numba_csr.numba.config.NUMBA_NUM_THREADS)
    if numba_csr.numba.get_num_threads() != wanted:
        numba_csr.numba.set_num_threads(wanted)


_workspaces = threading.local()


def _zeroed(tag: str, shape: tuple[int, ...], keep: bool, region: tuple = ()) -> tuple[torch.Tensor, bool]:
    """A zeroed float32 buffer of ``shape``; whether it is a reused one (whose margins are still zero).

    Temporaries (``keep`` False) come from a per-thread pool keyed by tag, shape and ``region`` (what
    determines the part callers overwrite): a fresh buffer of tens of MiB costs more in page faults than a
    99%-sparse layer costs in arithmetic. Callers overwrite only that part, so a reused buffer's zero margins
    hold. A buffer autograd keeps for the backward is fresh.
    """
    if keep:
        return torch.zeros(shape), False
    pool = getattr(_workspaces, "pool", None)
    if pool is None:
        pool = _workspaces.pool = {}
    key = (tag, shape, region)
    if key in pool:
        return pool[key], True
    if len(pool) > 64:  # many shapes (a sweep over batch sizes): start over rather than grow without bound
        pool.clear()
    pool[key] = torch.zeros(shape)
    return pool[key], False


def _tile(channels: int, tail: int, grid: int) -> int:
    tile = max(256, min(4096, _L2_FLOATS // max(1, channels) - tail))
    return min(grid, tile // 16 * 16) or grid


@dataclass(frozen=True)
class _Geometry:
    """Shapes of one call: input (N, C, H, W), kernel, stride, padding -> the padded, phased grid."""

    batch: int
    height: int
    width: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int] = (1, 1)

    @property
    def padded(self) -> tuple[int, int]:
        return self.height + 2 * self.padding[0], self.width + 2 * self.padding[1]

    @property
    def span(self) -> tuple[int, int]:
        """The kernel's extent in input pixels (dilated)."""
        (kh, kw), (dh, dw) = self.kernel, self.dilation
        return dh * (kh - 1) + 1, dw * (kw - 1) + 1

    @property
    def out(self) -> tuple[int, int]:
        (hp, wp), (kh, kw), (sh, sw) = self.padded, self.span, self.stride
        return (hp - kh) // sh + 1, (wp - kw) // sw + 1

    @property
    def grid(self) -> tuple[int, int]:
        """The phase images' size: every phase padded to the largest."""
        (hp, wp), (sh, sw) = self.padded, self.stride
        return -(-hp // sh), -(-wp // sw)

    @property
    def phase_kernel(self) -> tuple[int, int]:
        (kh, kw), (sh, sw) = self.span, self.stride
        return -(-kh // sh), -(-kw // sw)


class SparsePattern:
    """The non-zero positions of a ``(O, C, kh, kw)`` (or ``(O, C)``) weight, for one stride, padding, dilation."""

    def __init__(self, mask: torch.Tensor, stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                 dilation: tuple[int, int] = (1, 1)) -> None:
        mask = mask.detach().to("cpu", torch.bool)
        if mask.dim() == 2:
            mask = mask[:, :, None, None]
        self.shape = tuple(mask.shape)
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        outputs, channels, kh, kw = self.shape
        (sh, sw), (dh, dw) = self.stride, self.dilation
        # (o, c, a, b) in CSR order: by output row, then channel, then kernel offset (memory order of the input)
        index = mask.reshape(-1).nonzero().squeeze(1)
        self.flat_index = index  # positions in the flat weight: values = weight.view(-1)[flat_index]
        o, rest = index // (channels * kh * kw), index % (channels * kh * kw)
        c, rest = rest // (kh * kw), rest % (kh * kw)
        a, b = dh * (rest // kw), dw * (rest % kw)  # offsets in input pixels
        self.nnz = int(index.numel())
        self.density = self.nnz / max(1, mask.numel())
        self.outputs = outputs
        self.rows_of = o  # each non-zero's output channel
        self.virtual = (c * sh * sw + (a % sh) * sw + (b % sw))
        self.qa, self.qb = a // sh, b // sw
        self.indptr = np.zeros(outputs + 1, dtype=np.int64)
        self.indptr[1:] = np.cumsum(np.bincount(o.numpy(), minlength=outputs))
        # the transposed CSR (rows: virtual input channels), for the input gradient
        order = torch.from_numpy(np.lexsort((o.numpy(), self.virtual.numpy())))
        self.t_order = order
        self.t_indptr = np.zeros(channels * sh * sw + 1, dtype=np.int64)
        self.t_indptr[1:] = np.cumsum(np.bincount(self.virtual.numpy(), minlength=channels * sh * sw))
        self._channel = self.virtual.numpy().astype(np.int64)
        self._t_channel = o[order].numpy().astype(np.int64)
        self._shifts: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def shifts(self, geometry: _Geometry, inner: int) -> tuple[np.ndarray, np.ndarray]:
        """Forward shifts on the input's phase grid, and flipped shifts on the output gradient's grid."""
        key = (geometry.grid[1], geometry.phase_kernel, inner)
        if key not in self._shifts:
            grid_w = geometry.grid[1]
            pkh, pkw = geometry.phase_kernel
            forward = ((self.qa * grid_w + self.qb) * inner).numpy().astype(np.int64)
            t_width = grid_w + pkw - 1
            transposed = ((pkh - 1 - self.qa) * t_width + (pkw - 1 - self.qb)) * inner
            self._shifts[key] = (forward, transposed[self.t_order].numpy().astype(np.int64))
        return self._shifts[key]

    def values(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.detach().reshape(-1)[self.flat_index].float().contiguous()

    # ---- the three products ---------------------------------------------------------------------------------

    def geometry(self, x: torch.Tensor) -> _Geometry:
        return _Geometry(x.shape[0], x.shape[2], x.shape[3], self.shape[2:], self.stride, self.padding,
                         self.dilation)

    def rows(self, x: torch.Tensor, geometry: _Geometry, inner: int, keep: bool = True) -> torch.Tensor:
        """``x`` (N, C, H, W) as the zero-padded phase rows ``(C * s * s, grid + tail)`` of layout ``inner``;
        ``keep``: a fresh buffer (autograd saves it), else a pooled one, valid until the next call on this
        thread."""
        (gh, gw), (sh, sw), (ph, pw) = geometry.grid, self.stride, self.padding
        channels, batch = x.shape[1], x.shape[0]
        pkh, pkw = geometry.phase_kernel
        tail = ((pkh - 1) * gw + pkw - 1) * inner
        rows, _ = _zeroed("rows", (channels * sh * sw, batch * gh * gw + tail), keep, (geometry, inner))
        grid = rows[:, :batch * gh * gw].view(channels, sh, sw, batch // inner, gh, gw, inner)
        source = _view5(x, inner)
        if (sh, sw) == (1, 1):
            grid[:, 0, 0, :, ph:ph + geometry.height, pw:pw + geometry.width].copy_(source)
            return rows
        for ra in range(sh):
            for rb in range(sw):
                # phase (ra, rb) holds padded pixels ra + s * i, i.e. input pixels ra - ph + s * i: the first
                # i inside the image is ceil((ph - ra) / s)
                top, left = -(-(ph - ra) // sh), -(-(pw - rb) // sw)
                first_h, first_w = ra + sh * top - ph, rb + sw * left - pw
                phase = source[:, :, first_h::sh, first_w::sw]
                if phase.numel() == 0:  # a phase that lies wholly in the padding
                    continue
                grid[:, ra, rb, :, top:top + phase.shape[2], left:left + phase.shape[3]].copy_(phase)
        return rows

    def forward(self, x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, *, relu: bool = False,
                keep: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``conv2d(x, W)`` (+ bias, ReLU) from the non-zeros; also the rows (``keep``: fresh, for the weight
        gradient; else pooled, see :meth:`rows`) and the layout they are in."""
        _follow_torch_threads()
        geometry = self.geometry(x)
        inner = _inner(x.shape[0], geometry.width)
        rows = self.rows(x, geometry, inner, keep)
        out_h, out_w = geometry.out
        batch = x.shape[0]
        out = _empty_nchw(batch, self.outputs, out_h, out_w, inner)
        bias_np = (bias.detach().float() if bias is not None else torch.zeros(self.outputs)).contiguous().numpy()
        forward, _ = self.shifts(geometry, inner)
        (gh, gw), grid = geometry.grid, batch * geometry.grid[0] * geometry.grid[1]
        numba_csr.csr_shift_matmul(rows.numpy(), self.indptr, self._channel, forward, values.numpy(), bias_np,
                                   _flat(out, inner), gh, gw, inner, out_h, out_w,
                                   _tile(rows.shape[0], rows.shape[1] - grid, grid), relu)
        return out, rows, inner

    def input_grad(self, grad_out: torch.Tensor, values: torch.Tensor, geometry: _Geometry,
                   channels: int) -> torch.Tensor:
        """``conv2d``'s gradient with respect to its input: the transposed kernel over the output gradient."""
        _follow_torch_threads()
        (gh, gw), (sh, sw), (ph, pw) = geometry.grid, self.stride, self.padding
        pkh, pkw = geometry.phase_kernel
        batch, outputs, out_h, out_w = grad_out.shape
        inner = _inner(batch, geometry.width)  # the gradient in the layout the forward read its input in
        t_h, t_w = gh + pkh - 1, gw + pkw - 1
        tail = ((pkh - 1) * t_w + pkw - 1) * inner
        rows, _ = _zeroed("grad_rows", (outputs, batch * t_h * t_w + tail), False, (geometry, inner, out_h, out_w))
        rows[:, :batch * t_h * t_w].view(outputs, batch // inner, t_h, t_w, inner)[
            :, :, pkh - 1:pkh - 1 + out_h, pkw - 1:pkw - 1 + out_w].copy_(_view5(grad_out, inner))
        phases = torch.empty(channels * sh * sw, batch // inner, gh, gw, inner, dtype=torch.float32)
        _, transposed = self.shifts(geometry, inner)
        numba_csr.csr_shift_matmul(rows.numpy(), self.t_indptr, self._t_channel, transposed,
                                   values[self.t_order].contiguous().numpy(), np.zeros(phases.shape[0], np.float32),
                                   phases.view(phases.shape[0], -1).numpy(), t_h, t_w, inner, gh, gw,
                                   _tile(outputs, tail, batch * t_h * t_w), False)
        hp, wp = geometry.padded
        if (sh, sw) == (1, 1):
            grad_padded = phases
        else:
            grad_padded = phases.new_empty(channels, batch // inner, hp, wp, inner)
            split = phases.view(channels, sh, sw, batch // inner, gh, gw, inner)
            for ra in range(sh):
                for rb in range(sw):
                    target = grad_padded[:, :, ra::sh, rb::sw]
                    target.copy_(split[:, ra, rb, :, :target.shape[2], :target.shape[3]])
        return _nchw(grad_padded[:, :, ph:ph + geometry.height, pw:pw + geometry.width], inner)

    def weight_grad(self, grad_out: torch.Tensor, rows: torch.Tensor, geometry: _Geometry, inner: int) -> torch.Tensor:
        """The weight gradient at the non-zeros (``nnz`` values, CSR order); ``rows`` as the forward made them."""
        _follow_torch_threads()
        gh, gw = geometry.grid
        batch, outputs, out_h, out_w = grad_out.shape
        on_grid = _zeroed("grad_grid", (outputs, batch // inner, gh, gw, inner), False, (out_h, out_w))[0]
        on_grid[:, :, :out_h, :out_w].copy_(_view5(grad_out, inner))
        forward, _ = self.shifts(geometry, inner)
        grid = batch * gh * gw
        tile = _tile(rows.shape[0], rows.shape[1] - grid, grid)
        chunks = max(1, min(numba_csr.numba.get_num_threads(), math.ceil(grid / tile)))
        return torch.from_numpy(numba_csr.sampled_grad(on_grid.view(outputs, grid).numpy(), rows.numpy(),
                                                       self.indptr, self._channel, forward, tile, chunks))


def _inner(batch: int, width: int) -> int:
    """The layout of a call on input maps ``width`` wide: images side by side (1), or the batch innermost
    (``batch``) so that rows of the grid stay long where the maps are narrow. A layer's output comes in the
    layout its input went in, and the next layer, whose input width is that output's, mostly reads it in the
    same one: its rows are then a plain copy."""
    return batch if batch > 1 and width < _WIDE else 1


def _view5(t: torch.Tensor, inner: int) -> torch.Tensor:
    """An (N, C, H, W) tensor as (C, outer, H, W, inner): the order the kernels' grids use."""
    return t.permute(1, 0, 2, 3).unsqueeze(-1) if inner == 1 else t.permute(1, 2, 3, 0).unsqueeze(1)


def _nchw(t5: torch.Tensor, inner: int) -> torch.Tensor:
    """The inverse of :func:`_view5`."""
    return t5.squeeze(-1).permute(1, 0, 2, 3) if inner == 1 else t5.squeeze(1).permute(3, 0, 1, 2)


def _empty_nchw(batch: int, channels: int, height: int, width: int, inner: int) -> torch.Tensor:
    """An (N, C, H, W) tensor laid out as (C, outer, H, W, inner) in memory; not a view, so that autograd lets
    in-place layers (ReLU(inplace=True)) modify a function's output. Elementwise layers keep the strides."""
    if inner == 1:
        strides = (height * width, batch * height * width, width, 1)
    else:
        strides = (1, height * width * batch, width * batch, batch)
    return torch.empty_strided((batch, channels, height, width), strides, dtype=torch.float32)


def _flat(t: torch.Tensor, inner: int) -> np.ndarray:
    """:func:`_empty_nchw`'s memory as (C, rest), for the kernel."""
    return _view5(t, inner).reshape(t.shape[1], -1).numpy()


class _SparseConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, pattern: SparsePattern, relu: bool, values: torch.Tensor | None):
        values = pattern.values(weight) if values is None else values.detach().float().contiguous()
        source = x.detach().float()
        out, rows, inner = pattern.forward(source, values, bias, relu=relu, keep=ctx.needs_input_grad[1])
        ctx.pattern, ctx.geometry, ctx.channels, ctx.relu = pattern, pattern.geometry(source), x.shape[1], relu
        ctx.weight_shape, ctx.in_dtype, ctx.inner = weight.shape, x.dtype, inner
        ctx.save_for_backward(values, rows if ctx.needs_input_grad[1] else None, out if relu else None)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        values, rows, out = ctx.saved_tensors
        pattern, geometry = ctx.pattern, ctx.geometry
        grad_out = grad_out.float()
        if ctx.relu:
            grad_out = grad_out * (out > 0)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = pattern.input_grad(grad_out, values, geometry, ctx.channels).to(ctx.in_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros(ctx.weight_shape, dtype=torch.float32)
            grad_w.view(-1)[pattern.flat_index] = pattern.weight_grad(grad_out, rows, geometry, ctx.inner)
        if ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None


def sparse_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pattern: SparsePattern,
                relu: bool = False, values: torch.Tensor | None = None) -> torch.Tensor:
    """``conv2d(x, weight, bias, stride, padding, dilation)`` (ReLU after if ``relu``) through the CSR kernels,
    with autograd.

    ``weight`` must be zero outside ``pattern`` (the mask it was built from); the gradient it receives is zero
    there too. A 4-D ``x`` is an image batch; a 2-D ``x`` with a 2-D weight is a Linear layer's input.
    ``values`` (the non-zeros in the pattern's order, e.g. with a BatchNorm folded in) replaces the weight's own
    values; the weight then gets no gradient.
    """
    if values is not None and weight.requires_grad:
        raise ValueError("sparse_conv: values given for a weight that requires a gradient")
    if x.dim() == 2:
        out = _SparseConvFunction.apply(x[:, :, None, None], weight, bias, pattern, relu, values)
        return out.view(x.shape[0], -1)
    return _SparseConvFunction.apply(x, weight, bias, pattern, relu, values)
