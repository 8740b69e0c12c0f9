"""Pretrained starts: a base or reference network that begins from weights learned elsewhere (transfer learning).

``[model] pretrained`` (and each ``[[references]]`` entry's) is ``false`` (from scratch: :func:`build_model`),
``true`` (the library's pretrained weights: torchvision's ``weights="DEFAULT"``, timm's ``pretrained=True``, fetched
by the library into its cache) or the path of a local weights file (a state_dict saved with ``torch.save``, a
timm or torchvision training checkpoint that nests one under ``state_dict``/``model``, or a ``.safetensors`` file:
the form users have on a cluster without internet).

The network is built for the experiment's classes and input channels (:func:`build_model`, seeded by the caller) and
the pretrained tensors are put into it, every tensor equal to the file's except two kinds:

- the classifier, when the file's has another number of classes: the freshly initialised one is kept (a tensor
  whose first dimension is ``num_classes`` in the model and another in the file, the rest of its shape equal);
- the stem, when the file's reads another number of input channels: its weight is adapted as timm's ``in_chans``
  adapts it (``timm.models.adapt_input_conv``): summed over the file's channels for one input channel (the stem
  answers a grey image as it answered the same image in R, G and B), else the file's channels repeated and scaled
  by ``file channels / in_channels`` (its weights keep their sum; for a multiple of 3 channels, the same answer to
  a grey image).

Anything else that does not fit is refused in one line naming the input. Whether weights can be had at all (a
library model without pretrained weights, a machine that cannot reach the hub and has nothing cached) is the check
before any work (:func:`weights_problem`, called by the preflight); it never downloads, and tests replace
:func:`reachable`.
"""
from __future__ import annotations

import math
import os
import socket
import threading
from urllib.parse import urlparse

import torch
from torch import nn

from nps.pipeline.errors import NpsError, one_line
from nps.pipeline.network.checkpoints import mismatch_text
from nps.pipeline.network.models import build_model, model_kind

PROBE_TIMEOUT_S = 3.0  # the preflight's reachability probe of a model hub: a connection, never a download
Pretrained = bool | str  # the key's value: false, true, or a path


def is_set(pretrained: Pretrained) -> bool:
    """Whether ``pretrained`` asks for a pretrained start (``true`` or a non-empty path)."""
    return pretrained is True or (isinstance(pretrained, str) and bool(pretrained.strip()))


def pretrained_of(cfg, name: str) -> Pretrained:
    """The ``pretrained`` value of the network ``name``: the base (``model.name``) or a ``[[references]]`` entry
    (checks refuse a reference named like the base, so the name says which)."""
    if name == cfg.model.name:
        return cfg.model.pretrained
    for ref in cfg.references:
        if ref.model == name:
            return ref.pretrained
    raise ValueError(f"{name!r} is neither model.name nor a reference")


def resolution_of(cfg, name: str, default: int) -> int:
    """The input size of the network ``name``: a reference's own ``resolution`` when set (a pretrained network is
    used at the size it was trained at), else ``default`` (the run's ``model.resolution``)."""
    for ref in cfg.references:
        if ref.model == name and name != cfg.model.name:
            return ref.resolution or default
    return default


# --------------------------------------------------------------------------------------------------------------------
# Building.


def build_start(name: str, pretrained: Pretrained, num_classes: int, in_channels: int) -> nn.Module:
    """The network ``name`` for ``num_classes`` and ``in_channels``: freshly initialised (``pretrained`` false:
    exactly :func:`build_model`), or with pretrained weights put in as the module docstring says.

    Raises
    ------
    NpsError
        A file that cannot be read or does not fit the model, a model without library weights.
    """
    model = build_model(name, num_classes=num_classes, in_channels=in_channels)
    if not is_set(pretrained):
        return model
    if pretrained is True:
        source, origin = library_state(name), f"{name}'s pretrained weights"
    else:
        from nps.pipeline.network.checkpoints import load_state_dict

        source, origin = load_state_dict(pretrained, what=f"{name} pretrained"), pretrained
    model.load_state_dict(adapted_state(model.state_dict(), source, num_classes, in_channels, origin, name))
    return model


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A stem's weight (out × file channels × kh × kw) for ``in_channels`` input channels, as timm's ``in_chans``
    adapts it: summed for one channel, else the file's channels repeated and scaled by file channels / in_channels."""
    source = weight.shape[1]
    if in_channels == source:
        return weight
    w = weight.float()  # half-precision files: sum in fp32
    if in_channels == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        w = w.repeat(1, math.ceil(in_channels / source), 1, 1)[:, :in_channels] * (source / in_channels)
    return w.to(weight.dtype)


def tensor_roles(expected: dict, source: dict, num_classes: int, in_channels: int) -> tuple[dict[str, str], str]:
    """What happens to each tensor of a model whose state_dict is ``expected`` (shapes only: meta tensors do) when
    ``source`` is put into it: ``copy``, ``stem`` (adapted, :func:`adapt_input_conv`) or ``head`` (the model's own
    initialisation kept); and why it cannot be done ("" when it can).

    Only the first conv weight may be a stem and only the last module's tensors a head (torchvision and timm
    register the classifier last), so a file of another width is refused, not half loaded."""
    keys = list(expected)
    first_conv = next((k for k in keys if expected[k].dim() == 4), None)
    last_module = keys[-1].rpartition(".")[0] if keys else ""
    roles, shapes, missing = {}, [], []
    for key, tensor in expected.items():
        want = tuple(tensor.shape)
        if key not in source:
            if key.endswith("num_batches_tracked"):  # older files lack BN's step counter; it does not compute
                roles[key] = "head"
            else:
                missing.append(key)
            continue
        have = tuple(source[key].shape)
        if have == want:
            roles[key] = "copy"
        elif key == first_conv and len(have) == 4 and want[1] == in_channels and (want[0], *want[2:]) == (
                have[0], *have[2:]):
            roles[key] = "stem"
        elif key.rpartition(".")[0] == last_module and want and want[0] == num_classes and len(have) == len(want) and (
                want[1:] == have[1:]):
            roles[key] = "head"
        else:
            shapes.append(f"{key} {have} vs {want}")
    extra = [k for k in source if k not in expected]
    return roles, mismatch_text(shapes, missing, extra)


def _for(name: str, num_classes: int, in_channels: int) -> str:
    channels = "1 input channel" if in_channels == 1 else f"{in_channels} input channels"
    return f"{name} with {num_classes} class{'' if num_classes == 1 else 'es'} and {channels}"


def adapted_state(expected: dict, source: dict, num_classes: int, in_channels: int, origin: str, name: str) -> dict:
    """``expected`` (the freshly built model's state_dict) with ``source``'s tensors put in (see
    :func:`tensor_roles`); NpsError naming ``origin`` when they do not fit ``name``."""
    roles, problem = tensor_roles(expected, source, num_classes, in_channels)
    if problem:
        raise NpsError(f"{origin} does not fit {_for(name, num_classes, in_channels)} ({problem}); give weights of "
                       f"{name}")
    out = {}
    for key, role in roles.items():
        if role == "copy":
            out[key] = source[key]
        elif role == "stem":
            out[key] = adapt_input_conv(source[key], in_channels)
        else:
            out[key] = expected[key]
    return out


def library_state(name: str) -> dict:
    """The state_dict of ``name`` with its library's pretrained weights (ImageNet's 1000 classes, 3 channels):
    torchvision's ``weights="DEFAULT"``, timm's ``pretrained=True``; a timm file already in the cache is read from
    there (no request to the hub)."""
    kind = model_kind(name)
    try:
        if kind == "torchvision":
            import torchvision

            return torchvision.models.get_model(name, weights="DEFAULT").state_dict()
        if kind == "timm":
            import timm

            cached = cached_file(name)
            overlay = {"file": cached} if cached else None
            return timm.create_model(name[5:], pretrained=True, pretrained_cfg_overlay=overlay).state_dict()
    except NpsError:
        raise
    except Exception as exc:  # noqa: BLE001 - a failed download or a damaged cache file: the same user-facing line
        raise NpsError(f"{name}: its pretrained weights could not be loaded ({one_line(exc)}); "
                       f"{local_file_hint(name)}") from None
    raise NpsError(f"{name}: {no_weights_reason(name)}; {local_file_hint(name)}")


# --------------------------------------------------------------------------------------------------------------------
# Whether weights can be had (the preflight), without downloading anything.


def no_weights_reason(name: str) -> str:
    """Why ``name`` has no library weights ("" when it has)."""
    kind = model_kind(name)
    if kind == "torchvision":
        import torchvision

        try:
            torchvision.models.get_model_weights(name)
        except ValueError:
            return "torchvision has no pretrained weights for it"
        return ""
    if kind == "timm":
        try:
            import timm
        except ModuleNotFoundError:
            return "timm is not installed (pip install 'nps[timm]')"
        if not timm.models.is_model_pretrained(name[5:]):
            return "timm has no pretrained weights for it"
        return ""
    return "its pretrained weights are in no library nps knows (torchvision, timm)"


def weights_source(name: str) -> tuple[list[str], str]:
    """(files where the library caches ``name``'s pretrained weights, the URL it would fetch them from)."""
    hub = os.path.join(torch.hub.get_dir(), "checkpoints")
    if model_kind(name) == "torchvision":
        import torchvision

        url = torchvision.models.get_model_weights(name).DEFAULT.url
        return [os.path.join(hub, os.path.basename(urlparse(url).path))], url
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name[5:])
    files, url = [], cfg.url or ""
    if cfg.hf_hub_id:  # timm prefers the hub (its files: safetensors, else the pickle)
        from huggingface_hub import constants, try_to_load_from_cache

        for filename in ([cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]):
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)  # a path, or a marker when not cached
            if isinstance(found, str):
                files.append(found)
        url = f"{constants.ENDPOINT}/{cfg.hf_hub_id}"
    if cfg.url:
        files.append(os.path.join(hub, os.path.basename(urlparse(cfg.url).path)))
    return files, url


def cached_file(name: str) -> str:
    """The cached file of ``name``'s library weights ("" when none is cached)."""
    files, _ = weights_source(name)
    return next((f for f in files if os.path.isfile(f)), "")


def offline(url: str) -> bool:
    """Whether the environment says not to use the network for ``url`` (HF_HUB_OFFLINE for the Hugging Face hub)."""
    if "huggingface" in url:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    return False


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether ``url``'s host accepts a TCP connection within ``timeout`` seconds (name lookup included; nothing is
    sent). Only the preflight calls it; tests replace it."""
    parsed = urlparse(url)
    address = (parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80))
    done: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection(address, timeout=timeout):
                done.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(timeout)
    return bool(done)


def local_file_hint(name: str, key: str = "pretrained") -> str:
    """How to give ``name``'s weights as a local file."""
    if model_kind(name) == "timm":
        make = f"torch.save(timm.create_model('{name[5:]}', pretrained=True).state_dict(), 'weights.pt')"
    elif model_kind(name) == "torchvision":
        make = (f"torch.save(torchvision.models.get_model('{name}', weights='DEFAULT').state_dict(), "
                "'weights.pt')")
    else:
        make = "torch.save(model.state_dict(), 'weights.pt')"
    return f"give a local file instead: {key} = \"path/to/weights.pt\" (e.g. on a machine with internet: {make})"


def weights_problem(name: str, pretrained: Pretrained, num_classes: int, in_channels: int, key: str) -> str:
    """Why the network ``name`` cannot start from ``pretrained`` on this machine, as one line naming ``key``
    ("" when it can): a missing or unfitting file, a model without library weights, weights neither cached nor
    reachable. Reads the file's tensors but downloads nothing (at most a connection probe of the hub)."""
    if not is_set(pretrained):
        return ""
    if pretrained is not True:
        from nps.pipeline.network.checkpoints import load_state_dict

        if not os.path.exists(pretrained):
            return f"{key}: {pretrained} does not exist; give the path of {name}'s weights file"
        try:
            source = load_state_dict(pretrained, what=key)
        except NpsError as exc:
            return str(exc)
        model = build_model(name, num_classes=num_classes, in_channels=in_channels, device="meta")
        _, problem = tensor_roles(model.state_dict(), source, num_classes, in_channels)
        return (f"{key}: {pretrained} does not fit {_for(name, num_classes, in_channels)} ({problem}); give weights "
                f"of {name}") if problem else ""
    reason = no_weights_reason(name)
    if reason:
        return f"{key}: {name}: {reason}; {local_file_hint(name, key)}"
    if cached_file(name):
        return ""
    _, url = weights_source(name)
    if offline(url) or not reachable(url):
        return (f"{key}: {name}'s pretrained weights are not cached on this machine and {urlparse(url).hostname} "
                f"cannot be reached; {local_file_hint(name, key)}")
    return ""
