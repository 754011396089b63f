"""Errors shown to users.

Raise :class:`UserError` for anything a user can fix (bad input, missing file,
offline weights).  The CLI prints its message on one line, without a traceback,
and exits with status 2.  The message must name the file and the reason.
"""


class UserError(Exception):
    """A problem the user can fix; printed without a traceback."""


class InputFileError(UserError):
    """One input file cannot be used; names the file and the reason."""

    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = str(reason)
        super().__init__(f"{self.path}: {self.reason}")
