"""The one exception type for a user's mistake (bad path, unknown name, corrupt file).

The CLI prints it as a single ``error: ...`` line and exits non-zero; anything else is a bug
and keeps its traceback.
"""


class QtoolError(Exception):
    """A problem with what the user asked for, worded so the user can fix it."""
