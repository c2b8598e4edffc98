"""Studies: sweeps of training runs (sweep files, the local and Slurm backends), their reports, plots and the
statistics behind them. Built on the training core (robust_sparse/) and evaluation (robust_sparse.eval); nothing
in the core imports from here."""
