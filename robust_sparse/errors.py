"""Errors a user can fix. The CLI turns them into one line on stderr and exit code 2."""


class UserError(Exception):
    """Bad input from the user (config, path, checkpoint, hyper-parameter); the message is the whole story."""


class ConfigError(UserError):
    """A config field is missing, mistyped or out of range. The message names the field."""


class CheckpointError(UserError):
    """A checkpoint is missing, truncated, corrupted or from an incompatible run."""


class DivergenceError(Exception):
    """Training diverged (NaN loss or accuracy stuck at chance); the best checkpoint is kept."""


class OutputError(UserError):
    """An output location cannot be written (disk full, permission denied, read-only, not a directory) or is not
    this command's to write (another program's folder, a directory in use); the message names the path."""
