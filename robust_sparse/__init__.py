"""robust_sparse: PyTorch toolkit for adversarially robust sparse training."""
