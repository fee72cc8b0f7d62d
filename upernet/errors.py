"""The one exception class for mistakes a user can fix (a path, a value, a missing package).

The command line prints a `UserError` as one line and exits with status 2; anything else is a bug
and keeps its traceback. It subclasses ValueError so that library callers who catch ValueError for
bad input keep working.
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input the user can fix; the message names the file or option and the fix."""


class MissingFile(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (still a FileNotFoundError for library callers)."""
