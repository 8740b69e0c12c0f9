"""A trained subnetwork as ONNX (``nps export ... --onnx FILE.onnx``), and its check with onnxruntime.

The ONNX file holds the physically pruned network (the same module :func:`nps.pipeline.deploy.export.
build_subnetwork` rebuilds, with its fine-tuned weights, in eval mode, float32): one input ``input`` of shape
``(batch, in_channels, resolution, resolution)`` with a dynamic batch axis, one output ``logits`` of shape
``(batch, num_classes)``, at opset :data:`OPSET`. It is written by torch's ``torch.export``-based exporter where
``onnxscript`` is installed (torch's default), else by its TorchScript exporter; which one is stated in the file.
The file is self-contained (no external data) and carries the export's metadata as JSON in the model's
``metadata_props`` (key ``nps``: model, keep counts, scores, the run's config, the dataset's fingerprint...), so
``nps export --verify FILE.onnx`` needs nothing else. The input is the normalised image, not the image: the
preprocessing it needs (per-channel mean and std on the 0–255 scale, input size, channel order, layout) is in
``metadata_props`` too, as JSON under ``nps_preprocessing`` and as readable keys (``mean``, ``std``, ``scale``,
``input_size``, ``channel_order``, ``layout``, ``formula``, ``val_transform``; lists as JSON):
``onnxruntime.InferenceSession(path).get_modelmeta().custom_metadata_map`` reads them.

:func:`verify_onnx` runs the file with onnxruntime (CPU, float32) on the val split the run evaluated on, and counts
the correct images. The reference is the stored top-1 when the run evaluated in float32 on the CPU (``[retrain]
amp`` resolved to none there); when the run evaluated under bf16/fp16 autocast, the stored top-1 is not a float32
number, so the reference is the same subnetwork evaluated by torch in float32 on the same images (available when
the export's weights are at hand, i.e. right after exporting).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from nps.pipeline.errors import NpsError
from nps.pipeline.files import atomic_path

OPSET = 18
FORMAT = "nps-onnx-1"
INPUT, OUTPUT = "input", "logits"


def require_onnx():
    try:
        import onnx
        import onnxruntime
    except ModuleNotFoundError as exc:
        raise NpsError(f"ONNX export needs {exc.name}: pip install 'nps[onnx]' (onnx, onnxruntime, onnxscript)") \
            from None
    return onnx, onnxruntime


def _exporter() -> str:
    try:
        import onnxscript  # noqa: F401
    except ModuleNotFoundError:
        return "torchscript"
    return "dynamo"


def export_onnx(ckpt: dict, out: str | os.PathLike, *, opset: int = OPSET) -> dict:
    """Write the export ``ckpt`` (a dict with ``state_dict``, :func:`~nps.pipeline.deploy.export.
    subnetwork_checkpoint`) as ONNX to ``out`` (atomically); returns ``{"onnx", "opset", "exporter", "input",
    "output"}``."""
    proto, info = onnx_model(ckpt, opset=opset)
    save_onnx(proto, out)
    return {"onnx": str(out), **info}


def onnx_model(ckpt: dict, *, opset: int = OPSET):
    """The export ``ckpt`` as a checked ONNX ``ModelProto`` with nps's metadata, nothing written (so that
    ``nps export`` makes every check before its first write), and ``{"opset", "exporter", "input", "output"}``."""
    import contextlib
    import io
    import warnings

    import torch

    from nps.pipeline.deploy.export import build_subnetwork

    onnx, _ = require_onnx()
    model = build_subnetwork(ckpt)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    model = model.float().eval()
    c, r = int(ckpt["in_channels"]), int(ckpt["resolution"])
    example = (torch.zeros(2, c, r, r),)  # batch 2: a batch of 1 would be specialised away
    exporter = _exporter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporters' deprecation and progress chatter
        if exporter == "dynamo":
            program = torch.onnx.export(model, example, dynamo=True, opset_version=opset, input_names=[INPUT],
                                        output_names=[OUTPUT], verbose=False,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
            proto = program.model_proto
        else:
            buffer = io.BytesIO()
            torch.onnx.export(model, example, buffer, dynamo=False, opset_version=opset, input_names=[INPUT],
                              output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
            proto = onnx.load_from_string(buffer.getvalue())
    _set_metadata(proto, ckpt, opset, exporter)
    proto.producer_name = "nps"
    onnx.checker.check_model(proto)
    return proto, {"opset": opset, "exporter": exporter, "input": [INPUT, "batch", c, r, r],
                   "output": [OUTPUT, "batch", int(ckpt["num_classes"])]}


def _set_metadata(proto, ckpt: dict, opset: int, exporter: str) -> None:
    """``metadata_props``: ``nps`` (the export's fields as JSON), ``nps_format``, and the preprocessing the input
    needs (``nps_preprocessing`` as JSON, and readable keys ``mean``, ``std``, ``scale``, ``input_size``...:
    :func:`nps.pipeline.deploy.preprocessing.onnx_metadata`)."""
    from nps.pipeline.deploy.preprocessing import onnx_metadata

    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "format")}
    meta.update(format=FORMAT, opset=opset, exporter=exporter)
    entries = [("nps", json.dumps(meta)), ("nps_format", FORMAT)]
    if isinstance(ckpt.get("preprocessing"), dict):
        entries += onnx_metadata(ckpt["preprocessing"])
    del proto.metadata_props[:]
    for key, value in entries:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def save_onnx(proto, out: str | os.PathLike) -> Path:
    """Write ``proto`` to ``out`` atomically (:func:`nps.pipeline.files.atomic_path`)."""
    onnx, _ = require_onnx()
    with atomic_path(out) as tmp:
        onnx.save_model(proto, str(tmp))
    return Path(out)


def read_onnx_meta(path: str | os.PathLike) -> dict:
    """The export metadata an ONNX file written by :func:`export_onnx` carries; NpsError for any other file."""
    onnx, _ = require_onnx()
    path = Path(path)
    if not path.is_file():
        raise NpsError(f"{path}: no such file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # a protobuf decode error: not an ONNX file
        raise NpsError(f"{path}: not an ONNX model ({str(error).splitlines()[0] if str(error) else error!r}); give a "
                       "file written by nps export --onnx") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if props.get("nps_format") != FORMAT or "nps" not in props:
        raise NpsError(f"{path}: an ONNX model without nps's metadata; only files written by nps export --onnx can "
                       "be verified against their results")
    return json.loads(props["nps"])


def verify_onnx(path: str | os.PathLike, *, ckpt: dict | None = None, data_dir: str | os.PathLike | None = None,
                batch_size: int | None = None, val_loader=None, tolerance: float | None = None) -> dict:
    """Run an ONNX export with onnxruntime (CPU, float32) on the run's val split and compare the correct images with
    the reference (module docstring). ``ckpt``: the export's dict with its state_dict (for the float32 reference
    of a run that evaluated under autocast). Returns ``{"top1", "top5", "correct", "images", "reference",
    "reference_top1", "reference_correct", "stored_top1", "diff_images", "diff", "tolerance", "ok", "run_amp",
    "data"}``."""
    import numpy as np
    import torch

    from nps.pipeline.deploy.run_config import config_section, parse_config
    from nps.pipeline.deploy.verify import val_split
    from nps.pipeline.training.devices import resolve_amp

    _, ort = require_onnx()
    meta = read_onnx_meta(path)
    cpu = torch.device("cpu")
    loader, data = val_split(meta, data_dir=data_dir, device=cpu, batch_size=batch_size, val_loader=val_loader,
                             where=str(path))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    amp = str(config_section(parse_config(meta.get("config", ""), str(path)), "retrain").get("amp", "auto"))
    model = None
    if ckpt is not None:
        from nps.pipeline.deploy.export import build_subnetwork

        model = build_subnetwork(ckpt)
        model.load_state_dict(ckpt["state_dict"], strict=True)
        model = model.float().eval().to(memory_format=torch.channels_last)  # as the run evaluated on the CPU
        architecture = model
    else:  # pruning keeps depthwise convs depthwise: the base network resolves autocast as its subnetworks do
        from nps.pipeline.network.models import build_model

        architecture = build_model(meta["model"], num_classes=int(meta["num_classes"]),
                                   in_channels=int(meta["in_channels"]))
    run_amp = resolve_amp(amp, cpu, [architecture])
    correct = np.zeros(2, dtype=np.int64)
    torch_correct = 0
    for x, y in loader:
        logits = session.run(None, {name: np.ascontiguousarray(x.float().numpy())})[0]
        k = min(5, logits.shape[1])
        top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        labels = y.numpy().reshape(-1, 1)
        correct += [int((top[:, :1] == labels).sum()), int((top == labels).any(axis=1).sum())]
        if model is not None and run_amp is not None:
            with torch.no_grad():
                ref = model(x.float().contiguous(memory_format=torch.channels_last))
            torch_correct += int((ref.argmax(1) == y).sum())
    images = loader.images
    if images == 0:
        raise NpsError("the val split yielded no images")
    stored = float(meta.get("top1", math.nan))
    stored_correct = round(stored * images / 100.0) if math.isfinite(stored) else None
    if run_amp is None:
        reference, ref_correct = "stored top-1 (the run evaluated in float32 on the CPU)", stored_correct
    elif model is not None:
        reference, ref_correct = "torch float32 (the run evaluated under autocast)", torch_correct
    else:
        reference, ref_correct = (f"stored top-1 (the run evaluated under {str(run_amp).removeprefix('torch.')} "
                                  "autocast: expect a few images of difference; verify right after exporting "
                                  "for a float32 reference)"), stored_correct
    top1 = 100.0 * correct[0] / images
    diff_images = None if ref_correct is None else int(correct[0]) - ref_correct
    tol = 0.5 if tolerance is None else float(tolerance) * images / 100.0  # in images
    return {"top1": top1, "top5": 100.0 * correct[1] / images, "correct": int(correct[0]), "images": images,
            "reference": reference, "reference_correct": ref_correct,
            "reference_top1": None if ref_correct is None else 100.0 * ref_correct / images,
            "stored_top1": stored, "diff_images": diff_images,
            "diff": None if diff_images is None else 100.0 * diff_images / images,
            "tolerance": 100.0 * tol / images, "ok": diff_images is not None and abs(diff_images) <= tol,
            "run_amp": "off" if run_amp is None else str(run_amp).removeprefix("torch."),
            "data": None if data is None else str(data), "opset": meta.get("opset"), "exporter": meta.get("exporter")}

