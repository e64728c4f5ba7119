"""One exception type for errors a user can fix; the CLI prints its message on one line."""


class NDSError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""
