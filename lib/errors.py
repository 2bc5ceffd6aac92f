"""User-facing errors: a runner prints these as one clear line, without a traceback."""
from lib.config import ConfigError


class UserError(Exception):
    """Bad input from the user (a file, key or value); the message names what is at fault."""


USER_ERRORS = (UserError, ConfigError)
