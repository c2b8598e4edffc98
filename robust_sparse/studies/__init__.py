"""Studies: sweeps of training runs (sweep.py: the sweep file and its stages; local.py: the runner of one run's
child processes, which slurm.py's jobs run too), their reports (report.py, generic; hooks.py: what a study adds,
e.g. agent_gamma.py), plots and the statistics behind them. Built on the training core (robust_sparse/) and evaluation (robust_sparse.eval); nothing
in the core imports from here."""
