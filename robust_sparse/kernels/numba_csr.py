"""The compiled kernels: a CSR weight times shifted rows of a padded activation, and its weight gradient.

Every convolution here runs on the *padded grid* of its input: the activation is stored as one row per
channel, ``(C, N * Hp * Wp + tail)``, the zero-padded images of the whole batch flattened together. For a
stride-1 convolution the input pixel that kernel offset ``(a, b)`` pairs with output pixel ``j`` of the same
grid is ``j + a * Wp + b``, so one non-zero weight ``W[o, c, a, b]`` contributes ``v * row_c[j + d]`` to every
pixel ``j`` of output row ``o``, ``d = a * Wp + b``: an AXPY of a contiguous, shifted input row into the output
row (the direct sparse convolution of Park et al. 2017 and of XNNPACK's sparse inference, Elsen et al. 2020,
with the batch folded into the rows). No im2col matrix is ever built. The batch is laid out either image after
image (``inner`` 1) or innermost (``inner`` N: pixel-major, so that rows stay ``width * N`` floats long on small
maps; every shift is then multiplied by N). Grid pixels whose window leaves the image (the right and bottom
margins) are computed and dropped when the tile is written out: that waste is ``(Hp * Wp) / (Ho * Wo)``, 1.13x
at 32x32 and more on tiny maps, which ``train.sparse_kernels=auto``'s cost model counts.

Cache blocking: the grid is cut into tiles of ``tile`` pixels; for each tile every output row is finished (bias,
then all its non-zeros, eight per sweep) in a scratch accumulator that stays in L1 while the input tiles of every
channel, ``C * (tile + max shift)`` floats, stay in L2. Threads take whole tiles (``prange``), so no two threads
write one output element and the result does not depend on the thread count.

The same kernel computes the input gradient (a convolution of the padded output gradient with the flipped,
channel-transposed kernel: the transposed CSR), and :func:`sampled_grad` the weight gradient at the non-zero
positions only (a sampled dense-dense product). :mod:`robust_sparse.kernels.csr_conv` builds the rows, the
shifts and the strided (polyphase) cases around them.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

_OPTIONS = dict(cache=True, fastmath=True, nogil=True, error_model="numpy", boundscheck=False)


@njit(parallel=True, **_OPTIONS)
def csr_shift_matmul(rows, indptr, channel, shift, values, bias, out, grid_h, grid_w, inner, out_h, out_w, tile,
                     relu):  # pragma: no cover - jitted
    """``out[o, p] = bias[o] + sum_k values[k] * rows[channel[k], j + shift[k]]`` for every valid grid pixel.

    The grid is ``(outer, grid_h, grid_w, inner)`` flattened (the batch is split between ``outer`` and
    ``inner``: images side by side, or the batch innermost so that rows stay long on small maps); pixel ``j``
    of it lands in ``out[o]``, flattened ``(outer, out_h, out_w, inner)``, when its row ``h < out_h`` and
    column ``w < out_w`` (the rest is the padding's margin, computed and dropped).
    rows: (C, L) float32 with ``L >= grid + max(shift)``; out: (O, outer * out_h * out_w * inner) float32,
    written, not accumulated; indptr: (O + 1,) int64 CSR row pointers; channel, shift: (nnz,) int64;
    values: (nnz,) float32; bias: (O,) float32; relu: clamp at 0 on the way out (a fused ReLU).
    """
    outputs = out.shape[0]
    plane = grid_h * grid_w * inner
    outer = out.shape[1] // (out_h * out_w * inner)
    grid = outer * plane
    row = grid_w * inner
    tiles = (grid + tile - 1) // tile
    for t in prange(tiles):
        start = t * tile
        stop = min(start + tile, grid)
        width = stop - start
        # the tile's valid pixels as runs (offset in the tile, offset in the output row, length), found once
        segments = np.empty((width // row + 2, 3), dtype=np.int64)
        count = 0
        j = start
        while j < stop:
            n = j // plane
            r = j - n * plane
            h = r // row
            c = r - h * row  # w * inner + the batch index inside
            length = min(stop - j, row - c)
            if h < out_h and c < out_w * inner:
                segments[count, 0] = j - start
                segments[count, 1] = (n * out_h + h) * out_w * inner + c
                segments[count, 2] = min(length, out_w * inner - c)
                count += 1
            j += length
        acc = np.empty(width, dtype=np.float32)
        for o in range(outputs):
            level = bias[o]
            for j in range(width):
                acc[j] = level
            k = indptr[o]
            end = indptr[o + 1]
            # eight non-zeros per sweep: one load and one store of the accumulator per eight FMAs
            while k + 8 <= end:
                v0, v1, v2, v3 = values[k], values[k + 1], values[k + 2], values[k + 3]
                v4, v5, v6, v7 = values[k + 4], values[k + 5], values[k + 6], values[k + 7]
                s0 = rows[channel[k], start + shift[k]:stop + shift[k]]
                s1 = rows[channel[k + 1], start + shift[k + 1]:stop + shift[k + 1]]
                s2 = rows[channel[k + 2], start + shift[k + 2]:stop + shift[k + 2]]
                s3 = rows[channel[k + 3], start + shift[k + 3]:stop + shift[k + 3]]
                s4 = rows[channel[k + 4], start + shift[k + 4]:stop + shift[k + 4]]
                s5 = rows[channel[k + 5], start + shift[k + 5]:stop + shift[k + 5]]
                s6 = rows[channel[k + 6], start + shift[k + 6]:stop + shift[k + 6]]
                s7 = rows[channel[k + 7], start + shift[k + 7]:stop + shift[k + 7]]
                for j in range(width):
                    acc[j] += ((v0 * s0[j] + v1 * s1[j]) + (v2 * s2[j] + v3 * s3[j])) + \
                        ((v4 * s4[j] + v5 * s5[j]) + (v6 * s6[j] + v7 * s7[j]))
                k += 8
            while k + 2 <= end:
                v0, v1 = values[k], values[k + 1]
                s0 = rows[channel[k], start + shift[k]:stop + shift[k]]
                s1 = rows[channel[k + 1], start + shift[k + 1]:stop + shift[k + 1]]
                for j in range(width):
                    acc[j] += v0 * s0[j] + v1 * s1[j]
                k += 2
            while k < end:
                v0 = values[k]
                s0 = rows[channel[k], start + shift[k]:stop + shift[k]]
                for j in range(width):
                    acc[j] += v0 * s0[j]
                k += 1
            target = out[o]
            for segment in range(count):
                offset, destination, length = segments[segment, 0], segments[segment, 1], segments[segment, 2]
                if relu:
                    for i in range(length):
                        target[destination + i] = max(acc[offset + i], np.float32(0.0))
                else:
                    for i in range(length):
                        target[destination + i] = acc[offset + i]


@njit(parallel=True, **_OPTIONS)
def sampled_grad(grad_out, rows, indptr, channel, shift, tile, chunks):  # pragma: no cover - jitted
    """``g[k] = sum_j grad_out[o, j] * rows[channel[k], j + shift[k]]`` for every non-zero ``k`` of row ``o``.

    The weight gradient at the non-zero positions only. ``chunks`` partial sums (one per thread), each over
    a contiguous run of tiles, added in a fixed order, so the result does not depend on scheduling.
    """
    outputs, grid = grad_out.shape
    nnz = channel.shape[0]
    tiles = (grid + tile - 1) // tile
    per_chunk = (tiles + chunks - 1) // chunks
    partial = np.zeros((chunks, nnz), dtype=np.float64)
    for part in prange(chunks):
        for t in range(part * per_chunk, min((part + 1) * per_chunk, tiles)):
            start = t * tile
            stop = min(start + tile, grid)
            for o in range(outputs):
                gradient = grad_out[o, start:stop]
                k = indptr[o]
                end = indptr[o + 1]
                while k + 4 <= end:  # four non-zeros share each load of the gradient
                    s0 = rows[channel[k], start + shift[k]:stop + shift[k]]
                    s1 = rows[channel[k + 1], start + shift[k + 1]:stop + shift[k + 1]]
                    s2 = rows[channel[k + 2], start + shift[k + 2]:stop + shift[k + 2]]
                    s3 = rows[channel[k + 3], start + shift[k + 3]:stop + shift[k + 3]]
                    a0 = a1 = a2 = a3 = np.float32(0.0)
                    for j in range(stop - start):
                        g = gradient[j]
                        a0 += g * s0[j]
                        a1 += g * s1[j]
                        a2 += g * s2[j]
                        a3 += g * s3[j]
                    partial[part, k] += a0
                    partial[part, k + 1] += a1
                    partial[part, k + 2] += a2
                    partial[part, k + 3] += a3
                    k += 4
                while k < end:
                    source = rows[channel[k], start + shift[k]:stop + shift[k]]
                    acc = np.float32(0.0)
                    for j in range(stop - start):
                        acc += gradient[j] * source[j]
                    partial[part, k] += acc
                    k += 1
    result = np.zeros(nnz, dtype=np.float32)
    for k in prange(nnz):
        total = 0.0
        for part in range(chunks):
            total += partial[part, k]
        result[k] = total
    return result


def set_threads(count: int) -> int:
    """Run the kernels on ``count`` threads (capped by numba's pool); the count actually used."""
    count = max(1, min(int(count), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(count)
    return count
