"""The one exception type the CLI turns into a one-line message (no traceback), and what counts as bad input."""


class NpsError(Exception):
    """Bad input or an unsatisfiable request: the message names the input and what to do.

    Never raise it for a broken internal invariant: that is a bug, and a bug shows its traceback.
    """


def user_errors() -> tuple[type[Exception], ...]:
    """Errors that mean bad input, not a bug: the CLI prints them as one line (exit status 2)."""
    from nps.datasets.errors import DatasetError
    from nps.kernels.errors import SamplerError

    return (NpsError, SamplerError, DatasetError)
