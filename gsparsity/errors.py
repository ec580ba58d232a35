"""The one exception type for bad input."""


class UserError(ValueError):
    """Bad input or a broken file the user can fix.

    The top-level scripts print its message as one line on stderr and exit with
    status 2, never a traceback. Raise it with a message that says what is wrong
    and what to do, e.g. ``UserError(f"--data {path}: no 'train' folder in it")``.
    """
