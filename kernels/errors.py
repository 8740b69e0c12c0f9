"""Errors the samplers raise for requests that cannot be met (the CLI prints them as one line)."""


class SamplerError(ValueError):
    """An unsatisfiable or nearly empty space: the message names the constraint and the reachable range."""
