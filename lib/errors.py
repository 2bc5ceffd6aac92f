"""User-facing errors: a runner prints these as one clear line, without a traceback."""
from lib.config import ConfigError


class UserError(Exception):
    """Bad input from the user (a file, key or value); the message names what is at fault."""


class Interrupted(Exception):
    """A run stopped by a signal after saving its state. `lib.cli.run` exits with `exit_code`
    (128 + the signal number, as a shell reports a process killed by it: 143 for SIGTERM, 130 for
    SIGINT), so a scheduler tells an interrupted run, to requeue, from a finished one (0)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


USER_ERRORS = (UserError, ConfigError)
