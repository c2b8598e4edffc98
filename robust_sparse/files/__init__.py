"""Files a run leaves behind: atomic writes and one-line OS errors (atomic), run-directory ownership (rundir),
checkpoints read with ``weights_only=True`` (checkpoint), the allow-listed reader of the pickles submitit
leaves (plain_pickle), and the configs shipped with the package, found by name (shipped)."""
