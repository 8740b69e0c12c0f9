"""Errors for bad dataset input (the CLI prints them as one line)."""


class DatasetError(Exception):
    """A missing, truncated or malformed source or converted dataset: the message names the file and the problem."""
