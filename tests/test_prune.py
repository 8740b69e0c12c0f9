"""One-shot filter pruning: numerical equivalence with channel masking, identity with Torch-Pruning, exact
complexity, determinism."""
import copy

import numpy as np
import pytest
import torch
from archs import OTHERS, REPRESENTATIVE, counted, randomized
from torch import nn

from nps.pipeline.errors import NpsError
from nps.pipeline.network.layer_table import MODES, build_layer_table
from nps.pipeline.network.models import CIFAR_MODELS, build_model
from nps.pipeline.network.prune import CRITERIA, channel_indices, prune_model, pruning_plan

torch.set_num_threads(1)

RESOLUTION = 32


def make(name: str, in_channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return randomized(build_model(name, num_classes=10, in_channels=in_channels))


def masked_output(model: nn.Module, table, kept: list[np.ndarray], x: torch.Tensor) -> torch.Tensor:
    """The full model's output with every pruned channel zeroed at the input of each layer that reads it.

    Then a removed channel contributes nothing to any conv or linear layer, which is what the physically pruned
    model computes (wherever no layer mixes the values of a group's channels, as a layer norm over channels does)."""
    graph, selection = pruning_plan(model, table)
    kept_of = {cls.root: idx for cls, idx in zip(selection.classes, kept)}
    hooks = []
    for name in graph.weight_order:
        layer = graph.weights[name]
        mask, changed = [], False
        for seg in layer.inp:
            m = torch.zeros(seg.length)
            idx = kept_of.get(graph.root(seg.var))
            changed |= idx is not None and len(idx) < seg.length
            m[torch.as_tensor(np.arange(seg.length) if idx is None else idx)] = 1.0
            mask.append(m.repeat_interleave(seg.spread))
        if not changed:
            continue
        mask = torch.cat(mask)
        shape = (-1, 1, 1) if layer.kind != "linear" else (-1,)
        hooks.append(graph.modules[name].register_forward_pre_hook(
            lambda module, args, mask=mask.view(shape): (args[0] * mask,)))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for hook in hooks:
            hook.remove()


def unmixed_keep(model, table, rng, r_max):
    """A random keep vector that leaves at full width the groups whose values a layer norm mixes."""
    _, selection = pruning_plan(model, table)
    keep = table.keep(rng.uniform(0.0, r_max, len(table)))
    mixed = np.array([c.mixed for c in selection.classes])
    keep[mixed] = table.channels[mixed]
    return keep


def check_pruned(model, table, keep, criterion="l2", seed=0, in_channels=3):
    x = torch.randn(2, in_channels, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(1))
    kept = channel_indices(model, table, keep, criterion, seed)
    assert [len(k) for k in kept] == keep.tolist()
    pruned = prune_model(model, table, keep, criterion, seed)
    with torch.no_grad():
        got = pruned(x)
    want = masked_output(model, table, kept, x)
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(scale, 1.0))
    assert counted(pruned.to("meta"), RESOLUTION, in_channels) == (table.flops_of(keep), table.params_of(keep))
    return pruned


def _fast_then_slow(names):
    return [n for n in names if n in REPRESENTATIVE] + \
        [pytest.param(n, marks=pytest.mark.slow) for n in names if n in OTHERS]


@pytest.mark.zoo
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", _fast_then_slow(CIFAR_MODELS[:1] + REPRESENTATIVE[1:] + OTHERS))
def test_pruned_equals_masked_full_model(name, mode):
    model = make(name)
    table = build_layer_table(name, mode, RESOLUTION, num_classes=10)
    rng = np.random.default_rng(len(name))
    for r_max in (0.5, 0.9):
        check_pruned(model, table, unmixed_keep(model, table, rng, r_max))


def torch_pruning_removes(model: nn.Module, table, kept: list[np.ndarray], in_channels: int = 3) -> nn.Module:
    """A copy of ``model`` from which Torch-Pruning removes the channels nps does not keep, group by group."""
    tp = pytest.importorskip("torch_pruning")
    copied = copy.deepcopy(model)
    graph = tp.DependencyGraph().build_dependency(copied, example_inputs=torch.randn(1, in_channels, RESOLUTION,
                                                                                      RESOLUTION))
    modules = dict(copied.named_modules())
    for channels, members, idx in zip(table.channels, table.members, kept):
        removed = sorted(set(range(int(channels))) - set(idx.tolist()))
        if not removed:
            continue
        first = modules[members[0]]
        prune_fn = tp.prune_linear_out_channels if isinstance(first, nn.Linear) else tp.prune_conv_out_channels
        graph.get_pruning_group(first, prune_fn, idxs=removed).prune()
    return copied


_LAYER_SCALE_WARNING = "ignore:Unwrapped parameters detected"  # Torch-Pruning on ConvNeXt's layer scale: dim 0


@pytest.mark.zoo
@pytest.mark.filterwarnings(_LAYER_SCALE_WARNING)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", _fast_then_slow(CIFAR_MODELS[:1] + REPRESENTATIVE[1:] + OTHERS))
def test_pruned_model_is_torch_prunings_removal_of_the_same_channels(name, mode):
    model = make(name)
    table = build_layer_table(name, mode, RESOLUTION, num_classes=10)
    keep = table.keep(np.random.default_rng(3).uniform(0.0, 0.8, len(table)))
    kept = channel_indices(model, table, keep)
    ours = prune_model(model, table, keep)
    theirs = torch_pruning_removes(model, table, kept)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape and torch.equal(a[key], b[key]), key
    x = torch.randn(2, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


@pytest.mark.zoo
@pytest.mark.filterwarnings(_LAYER_SCALE_WARNING)
@pytest.mark.parametrize("name", _fast_then_slow(CIFAR_MODELS[:1] + REPRESENTATIVE[1:] + OTHERS))
def test_groups_are_torch_prunings_dependency_groups(name):
    # Torch-Pruning's DependencyGraph, an independent implementation, as the oracle of which layers each group
    # touches: the layers writing its channels, reading them, and normalising or rescaling them.
    tp = pytest.importorskip("torch_pruning")
    model = make(name)
    table = build_layer_table(name, "all", RESOLUTION, num_classes=10)
    graph, selection = pruning_plan(model, table)
    dependency = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, RESOLUTION,
                                                                                       RESOLUTION))
    names = {module: n for n, module in model.named_modules()}
    for cls in selection.classes:
        ours = set(cls.touching) - {owner for owner, t in graph.channel_tensors.items() if t.kind == "param"}
        first = graph.modules[cls.members[0]]
        prune_fn = tp.prune_linear_out_channels if isinstance(first, nn.Linear) else tp.prune_conv_out_channels
        width = cls.size // cls.structural
        group = dependency.get_pruning_group(first, prune_fn, idxs=[j * width for j in range(cls.structural)])
        theirs = {names[dep.target.module] for dep, _ in group if dep.target.module in names}
        assert theirs == ours, cls.name


@pytest.mark.parametrize("criterion", list(CRITERIA))
@pytest.mark.parametrize("mode", MODES)
def test_every_criterion_prunes_correctly(criterion, mode):
    model = make("resnet20")
    table = build_layer_table("resnet20", mode, RESOLUTION, num_classes=10)
    check_pruned(model, table, table.keep(np.full(len(table), 0.4)), criterion, seed=3)


def test_deterministic_and_original_untouched():
    model = make("resnet18")
    table = build_layer_table("resnet18", "all", RESOLUTION, num_classes=10)
    keep = table.keep(np.random.default_rng(0).uniform(0, 0.9, len(table)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = dict(model.named_modules())
    for criterion in CRITERIA:
        first = channel_indices(model, table, keep, criterion, seed=7)
        second = channel_indices(model, table, keep, criterion, seed=7)
        assert all(np.array_equal(a, b) for a, b in zip(first, second))
        assert all(np.all(np.diff(k) > 0) for k in first)
    a = prune_model(model, table, keep).state_dict()
    b = prune_model(model, table, keep).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert dict(model.named_modules()) == modules_before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    random_a = channel_indices(model, table, keep, "random", seed=1)
    random_b = channel_indices(model, table, keep, "random", seed=2)
    assert not all(np.array_equal(x, y) for x, y in zip(random_a, random_b))


def test_l2_keeps_largest_filters_and_residual_groups_sum_over_members():
    model = make("resnet20")
    table = build_layer_table("resnet20", "all", RESOLUTION, num_classes=10)
    modules = dict(model.named_modules())
    with torch.no_grad():
        conv = modules["layer1.0.conv1"].weight  # its own group: 16 filters
        conv.copy_(torch.ones_like(conv) * torch.arange(1, 17, dtype=torch.float32)[:, None, None, None])
        # Residual stream of layer2: channel 5 is huge in one member only, so its summed norm wins.
        modules["layer2.1.conv2"].weight[5] *= 100.0
    keep = table.channels.copy()
    g_internal = table.names.index("layer1.0.conv1")
    g_residual = table.names.index("layer2.residual")
    keep[g_internal], keep[g_residual] = 4, 1
    kept = channel_indices(model, table, keep, "l2")
    assert kept[g_internal].tolist() == [12, 13, 14, 15]
    assert kept[g_residual].tolist() == [5]
    check_pruned(model, table, keep)


def test_fpgm_prunes_the_filter_nearest_the_geometric_median():
    model = make("resnet20")
    table = build_layer_table("resnet20", "internal", RESOLUTION, num_classes=10)
    weight = dict(model.named_modules())["layer1.0.conv1"].weight
    with torch.no_grad():
        # Filters scattered around a common centre; filter 9 is their mean (nearest everyone), filter 3 a tiny
        # copy of a filter (smallest norm, hence far from all the others).
        spread = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.1
        weight.copy_(1.0 + spread)
        weight[9] = weight.mean(dim=0)
        weight[3] *= 1e-3
    keep = table.channels.copy()
    group = table.names.index("layer1.0.conv1")
    keep[group] = 15
    fpgm = channel_indices(model, table, keep, "fpgm")[group]
    assert 9 not in fpgm and 3 in fpgm
    assert 3 not in channel_indices(model, table, keep, "l2")[group]


def test_pruned_model_trains_and_keeps_flags():
    model = make("resnet20").train()
    model.conv1.weight.requires_grad_(False)
    table = build_layer_table("resnet20", "all", RESOLUTION, num_classes=10)
    pruned = prune_model(model, table, table.keep(np.full(len(table), 0.5)))
    assert pruned.training and all(m.training for m in pruned.modules())
    assert not pruned.conv1.weight.requires_grad and pruned.layer1[0].conv1.weight.requires_grad
    assert pruned.conv1.out_channels == 8 and pruned.fc.in_features == 32
    assert int(pruned.bn1.num_batches_tracked) == int(model.bn1.num_batches_tracked)
    loss = pruned(torch.randn(4, 3, RESOLUTION, RESOLUTION)).logsumexp(dim=1).mean()
    loss.backward()
    assert pruned.fc.weight.grad is not None and pruned.conv1.weight.grad is None


def test_bad_requests_rejected():
    model = make("resnet20")
    table = build_layer_table("resnet20", "all", RESOLUTION, num_classes=10)
    bad_keeps = [table.channels[:-1], np.append(table.channels, 1), table.channels + 1,
                 np.zeros(len(table), dtype=np.int64), np.stack([table.channels, table.channels])]
    for keep in bad_keeps:
        with pytest.raises(NpsError):
            prune_model(model, table, keep)
        with pytest.raises(NpsError):
            channel_indices(model, table, keep)
    with pytest.raises(NpsError, match="criterion"):
        prune_model(model, table, table.channels, criterion="taylor")
    with pytest.raises(NpsError, match="does not match"):
        prune_model(make("resnet32"), table, table.channels)
    with pytest.raises(NpsError, match="does not match"):
        prune_model(build_model("resnet20", num_classes=100), table, table.channels)
    with pytest.raises(NpsError, match="does not match"):
        prune_model(build_model("resnet20", num_classes=10, in_channels=1), table, table.channels)
    with torch.device("meta"):
        meta = build_model("resnet20", num_classes=10)
    with pytest.raises(NpsError, match="meta"):
        prune_model(meta, table, table.channels, criterion="l2")


OWN_AND_TIMM = ["own_models:tiny_cnn", "own_models:vgg_like", "timm:resnet10t", "timm:mobilenetv3_small_050",
                "timm:efficientnet_b0", "timm:convnext_atto"]


@pytest.mark.zoo
@pytest.mark.filterwarnings(_LAYER_SCALE_WARNING)
@pytest.mark.parametrize("name", OWN_AND_TIMM)
def test_user_and_timm_models(name, monkeypatch):
    # A flatten of a 4x4 map into a linear layer (vgg_like: each channel is 16 inputs), timm's BatchNormAct2d,
    # SqueezeExcite and DropPath: exact complexity, masked equivalence and Torch-Pruning's removal.
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    model = make(name)
    table = build_layer_table(name, "all", RESOLUTION, num_classes=10)
    assert len(table) >= 2
    rng = np.random.default_rng(0)
    keep = unmixed_keep(model, table, rng, 0.7)
    check_pruned(model, table, keep)
    ours = prune_model(model, table, keep)
    theirs = torch_pruning_removes(model, table, channel_indices(model, table, keep))
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
