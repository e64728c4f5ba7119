"""Errors a user can fix; the CLI prints the message on one line (exit 2).

Callers that must tell failures apart catch a subclass, never match on message text.
"""


class NDSError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""


class InvalidInputError(NDSError, ValueError):
    """An argument, file or document the user gave is malformed or out of range."""


class NotFoundError(NDSError, LookupError):
    """Something the user named (a file, an object, a stage output, a dataset) does not exist."""


class StorageError(NDSError, OSError):
    """An object store or file system failed (after retries), not the user's input."""
