"""Files a run leaves behind: atomic writes and run-directory ownership (rundir), checkpoints read with
``weights_only=True`` (checkpoint), and the allow-listed reader of the pickles submitit leaves (plain_pickle)."""
