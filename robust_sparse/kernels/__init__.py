"""Sparse kernels for the CPU: a direct sparse convolution in CSR form, for training and inference.

- :mod:`~robust_sparse.kernels.numba_csr`: the compiled kernels (numba);
- :mod:`~robust_sparse.kernels.csr_conv`: a layer's non-zero structure and the autograd function over it;
- :mod:`~robust_sparse.kernels.training`: the owner that runs a masked model's layers on them in training.
"""

from robust_sparse.kernels.csr_conv import SparsePattern, set_threads, sparse_conv
from robust_sparse.kernels.training import SparseKernels

__all__ = ["SparseKernels", "SparsePattern", "set_threads", "sparse_conv"]
