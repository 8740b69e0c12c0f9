"""Reading torch files nps did not necessarily write: tensors only, and one line when a file is not what it should be.

Every ``torch.load`` of nps goes through :func:`load_tensors`: ``weights_only=True`` (a pickle can run code, and a
checkpoint may come from anywhere), with torch's multi-line advice to retry with ``weights_only=False`` replaced by a
line that says what the file is and what to give instead.
"""
from __future__ import annotations

import os
import zipfile

from nps.pipeline.errors import NpsError


def why_unloadable(source, exc: BaseException) -> str:
    """Why ``torch.load(source, weights_only=True)`` failed, in words."""
    try:
        if hasattr(source, "seek"):
            source.seek(0)
            head = source.read(4)
            source.seek(0)
        else:
            with open(source, "rb") as fh:
                head = fh.read(4)
    except OSError as error:
        return f"cannot be read ({os.strerror(error.errno or 0) or error})"
    pickled = head[:2] == b"PK" or head[:1] == b"\x80"  # torch.save's zip archive, or its legacy pickle
    if pickled and "Weights only load failed" in str(exc) and "Unsupported global" in str(exc):
        return ("holds pickled Python objects (e.g. a whole nn.Module), not only tensors; nps loads tensors only "
                "(unpickling a file can run code): save model.state_dict() and give that file")
    if pickled or (not hasattr(source, "seek") and zipfile.is_zipfile(source)):
        return "is a damaged torch file (it cannot be read)"
    return "is not a torch file"


def load_tensors(source, what: str, hint: str = ""):
    """``torch.load(source, weights_only=True)`` on the CPU; NpsError ``"<what>: <source> <why>[; <hint>]"`` when it
    cannot (``what`` names the input: ``model.checkpoint``, ``--verify``...)."""
    import torch

    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        raise NpsError(f"{what}: {source} is a directory; give the file")
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        name = "the checkpoint" if hasattr(source, "seek") else source
        raise NpsError(f"{what}: {name} {why_unloadable(source, exc)}" + (f"; {hint}" if hint else "")) from None
