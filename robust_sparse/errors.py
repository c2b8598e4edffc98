"""Errors a user can fix, and the exit codes of every command. The CLI turns a user error into one line on stderr
and :attr:`ExitCode.USAGE`."""

import signal
from enum import IntEnum


class ExitCode(IntEnum):
    """What ``robust-sparse`` exits with (documented: scripts and schedulers read them). The sweep reads its
    training children's codes by these names, and a Slurm job ends with its training's."""

    OK = 0
    FAILED = 1  # a sweep's run or evaluation failed; doctor found a problem it did not fix
    USAGE = 2  # a user error (config, path, checkpoint, flag): one line on stderr
    DIVERGED = 3  # training diverged (NaN loss or accuracy stuck at chance); the best checkpoint is kept
    INTERRUPTED = 128 + signal.SIGINT  # Ctrl-C; the shell's convention for a signal, 130
    TERMINATED = 128 + signal.SIGTERM  # SIGTERM (a scheduler's stop), 143; resumable like Ctrl-C
    BROKEN_PIPE = 128 + signal.SIGPIPE  # stdout's reader left early (`head` after `configs`): quiet, like Unix tools


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
