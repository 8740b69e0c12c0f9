"""The one exception type the CLI turns into a one-line message (no traceback)."""


class NpsError(Exception):
    """Bad input or an unsatisfiable request: the message names the input and what to do."""
