"""From a model to its channel graph: trace it with torch.fx, run it on the meta device for the shapes, then
follow the channel axis through every operation (:mod:`nps.pipeline.network.channel_flow`)."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from nps.pipeline.errors import NpsError
from nps.pipeline.network.channel_flow import follow_channels
from nps.pipeline.network.channel_graph import ChannelGraph, UnsupportedPattern, _shape


class _Tracer(fx.Tracer):
    """Leaves: torch.nn's own modules, and any module that *is* a conv, linear or batch/group norm (timm's
    ``BatchNormAct2d`` or ``Conv2dSame`` included). LayerNorm subclasses (``LayerNorm2d``) are traced through: their
    permutes show on which axis they normalise."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
            return True
        if isinstance(m, nn.LayerNorm) and type(m) is not nn.LayerNorm:
            return False
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` as an fx graph (leaves as in :class:`_Tracer`), or UnsupportedPattern saying why it cannot be."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is the same user-facing problem
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UnsupportedPattern(f"{type(model).__name__} cannot be traced by torch.fx ({type(exc).__name__}: "
                                 f"{first[:200]}); nps needs a network without data-dependent control flow") from None
    return fx.GraphModule(model, graph)


class _Shapes(fx.Interpreter):
    """Runs the graph (on the meta device) and records each node's output shape in ``node.meta["nps_shape"]``;
    a node that fails is remembered in ``failed`` (torch.fx's ShapeProp prints a traceback instead)."""

    failed: fx.Node | None = None

    def run_node(self, n: fx.Node):
        try:
            result = super().run_node(n)
        except Exception:
            self.failed = self.failed or n
            raise
        n.meta["nps_shape"] = tuple(int(d) for d in result.shape) if isinstance(result, torch.Tensor) else None
        return result


def analyze(model: nn.Module, resolution: int, in_channels: int) -> tuple[ChannelGraph, fx.GraphModule]:
    """Trace ``model`` and follow its channels at ``resolution`` (a batch of one image, shapes only)."""
    gm = trace(model)
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example = torch.empty(1, in_channels, resolution, resolution, device="meta")
    shapes = None
    try:
        model.eval()
        meta_gm = gm if device.type == "meta" else fx.GraphModule(_meta_copy(model), gm.graph)
        shapes = _Shapes(meta_gm)
        with torch.no_grad():
            shapes.run(example)
    except Exception as exc:  # noqa: BLE001 - a failing forward pass at this size is a user-facing problem
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        node = shapes.failed if shapes is not None else None
        where = f" at {'layer ' + node.target if node.op == 'call_module' else 'operation ' + node.name}" \
            if node is not None else ""
        if "greater than actual input size" in first or "too small" in first:
            raise NpsError(f"resolution {resolution} is too small for this network: a feature map vanishes{where} "
                           f"({first}); use a larger resolution") from None
        raise NpsError(f"the network does not run on {in_channels}×{resolution}×{resolution} inputs{where} "
                       f"({first})") from None
    finally:
        model.train(was_training)
    for node in gm.graph.nodes:  # the shapes were recorded on the meta copy's nodes, the same graph object
        shape = _shape(node)
        if shape is not None and node.op != "output" and any(s == 0 for s in shape):
            raise NpsError(f"resolution {resolution} is too small for this network: a feature map vanishes at "
                           f"{node.target if node.op == 'call_module' else node.name}")
    return follow_channels(model, gm), gm


def _meta_copy(model: nn.Module) -> nn.Module:
    """A shape-only copy of ``model`` (parameters and buffers on the meta device; the original is untouched)."""
    import copy

    memo = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in memo:
            meta = tensor.detach().to("meta")
            memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


