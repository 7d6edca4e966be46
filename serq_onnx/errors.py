"""The one exception type users see: a message that names the problem and what to do."""


class SerqError(Exception):
    """A user-facing failure (bad input, unsupported graph, missing file).

    The CLI prints ``str(err)`` on one line and exits non-zero; nothing deeper is shown.
    """
