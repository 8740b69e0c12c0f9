"""Checkpoints: reading torch files nps did not necessarily write (tensors only, one line when a file is not what it
should be), and whether a state_dict fits a model.

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


def load_safetensors(path: str, what: str) -> dict:
    """The tensors of a ``.safetensors`` file (the form the Hugging Face hub keeps timm's weights in)."""
    try:
        from safetensors.torch import load_file
    except ModuleNotFoundError:
        raise NpsError(f"{what}: {path} is a safetensors file and the safetensors package is missing: "
                       "pip install safetensors (or 'nps[timm]')") from None
    if os.path.isdir(path):
        raise NpsError(f"{what}: {path} is a directory; give the file")
    try:
        return load_file(path, device="cpu")
    except OSError as exc:
        raise NpsError(f"{what}: {path} cannot be read ({exc.strerror or exc})") from None
    except Exception:  # noqa: BLE001 - safetensors raises its own error types for a damaged header
        raise NpsError(f"{what}: {path} is a damaged safetensors file (it cannot be read)") from None


def load_state_dict(path: str, what: str = "model.checkpoint") -> dict:
    """The state_dict in a checkpoint file: a bare state_dict, or one under ``model``/``state_dict`` (timm's and
    torchvision's training scripts nest it so), or a ``.safetensors`` file; ``what`` names the input in errors."""
    if isinstance(path, (str, os.PathLike)) and str(path).endswith(".safetensors"):
        obj = load_safetensors(str(path), what)
    else:
        obj = load_tensors(path, what, "save the model's state_dict() with torch.save")
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise NpsError(f"{what}: {path} holds no state_dict")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}


def checkpoint_mismatch(expected: dict, state: dict) -> str:
    """Why ``state`` cannot be loaded into a model whose state_dict is ``expected`` ("" when it can)."""
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    return mismatch_text(shapes, missing, extra)


def mismatch_text(shapes: list[str], missing: list[str], extra: list[str]) -> str:
    """One line: the first differing shapes, and how many keys are missing or unexpected ("" when none)."""
    parts = []
    if shapes:
        parts.append(f"shape mismatch: {', '.join(shapes[:2])}")
    if missing:
        parts.append(f"{len(missing)} missing keys ({', '.join(missing[:2])}, ...)")
    if extra:
        parts.append(f"{len(extra)} unexpected keys ({', '.join(extra[:2])}, ...)")
    return "; ".join(parts)


def check_checkpoint(path: str, model_name: str, num_classes: int, in_channels: int) -> dict:
    """The checkpoint's state_dict, after checking it fits the configured model (NpsError naming model.checkpoint)."""
    from nps.pipeline.network.models import build_model

    model = build_model(model_name, num_classes=num_classes, in_channels=in_channels, device="meta")
    state = load_state_dict(path)
    problem = checkpoint_mismatch(model.state_dict(), state)
    if problem:
        raise NpsError(f"model.checkpoint: {path} does not match {model_name} with {num_classes} classes and "
                       f"{in_channels} input channels ({problem})")
    return state


def load_base_network(path, model_name: str, num_classes: int, in_channels: int):
    """The base network with the checkpoint's weights, in eval mode on the CPU (after :func:`check_checkpoint`)."""
    from nps.pipeline.network.models import build_model

    state = check_checkpoint(path, model_name, num_classes, in_channels)
    model = build_model(model_name, num_classes=num_classes, in_channels=in_channels)
    model.load_state_dict(state)
    return model.eval()
