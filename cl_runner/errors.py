"""User-facing errors: printed as one line by the CLI, never as a traceback."""


class UserError(Exception):
    """Bad input from the user (config, data, run directory). The message says what and how to fix it."""
