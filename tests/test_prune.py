"""One-shot filter pruning: numerical equivalence with channel masking, exact complexity, determinism."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nps.pipeline.errors import NpsError
from nps.pipeline.graph import MODES, build_layer_table, resnet_layout
from nps.pipeline.models import MODELS, build_model
from nps.pipeline.prune import CRITERIA, channel_indices, prune_model

torch.set_num_threads(1)

RESOLUTION = 32


def randomized(name: str, seed: int = 0) -> nn.Module:
    """A base network in eval mode with random BN affine parameters and running statistics, so that a slicing
    mistake in any BN shows up in the outputs."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=10)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def masked_output(model: nn.Module, table, kept: list[np.ndarray], x: torch.Tensor) -> torch.Tensor:
    """The full model's output with every pruned channel zeroed right after the BN that follows its conv.

    Zeroing after BN makes the removed channels contribute nothing to their consumers and keeps residual adds
    consistent, which is exactly what the physically pruned model computes."""
    modules = dict(model.named_modules())
    bn_of = {slot.conv: slot.bn for slot in resnet_layout(model, table.mode).slots}
    hooks = []
    for channels, members, indices in zip(table.channels, table.members, kept):
        mask = torch.zeros(int(channels))
        mask[torch.as_tensor(indices)] = 1.0
        for member in members:
            hooks.append(modules[bn_of[member]].register_forward_hook(
                lambda module, args, out, mask=mask: out * mask[:, None, None]))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for hook in hooks:
            hook.remove()


def counted(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2, sum(p.numel() for p in model.parameters())


def check_pruned(model, table, keep, criterion="l2", seed=0):
    x = torch.randn(2, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(1))
    kept = channel_indices(model, table, keep, criterion, seed)
    assert [len(k) for k in kept] == keep.tolist()
    pruned = prune_model(model, table, keep, criterion, seed)
    with torch.no_grad():
        got = pruned(x)
    want = masked_output(model, table, kept, x)
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(scale, 1.0))
    flops, params = counted(pruned, x[:1])
    assert flops == table.flops(keep) and params == table.params(keep)
    return pruned


SMALL = [m for m in MODELS if m not in ("resnet101", "resnet152", "wide_resnet50_2")]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", SMALL)
def test_pruned_equals_masked_full_model(name, mode):
    model = randomized(name)
    table = build_layer_table(name, mode, RESOLUTION, num_classes=10)
    rng = np.random.default_rng(len(name))
    for r_max in (0.5, 0.9):
        check_pruned(model, table, table.keep(rng.uniform(0.0, r_max, len(table))))


@pytest.mark.parametrize("name, mode", [("resnet101", "internal"), ("resnet152", "all"),
                                        ("wide_resnet50_2", "all")])
def test_pruned_equals_masked_big_models(name, mode):
    model = randomized(name)
    table = build_layer_table(name, mode, RESOLUTION, num_classes=10)
    check_pruned(model, table, table.keep(np.random.default_rng(5).uniform(0.0, 0.8, len(table))))


@pytest.mark.slow
@pytest.mark.parametrize("name, mode", [("resnet101", "all"), ("resnet152", "internal"),
                                        ("wide_resnet50_2", "internal")])
def test_pruned_equals_masked_big_models_other_mode(name, mode):
    test_pruned_equals_masked_big_models(name, mode)


@pytest.mark.parametrize("criterion", list(CRITERIA))
@pytest.mark.parametrize("mode", MODES)
def test_every_criterion_prunes_correctly(criterion, mode):
    model = randomized("resnet20")
    table = build_layer_table("resnet20", mode, RESOLUTION, num_classes=10)
    check_pruned(model, table, table.keep(np.full(len(table), 0.4)), criterion, seed=3)


def test_deterministic_and_original_untouched():
    model = randomized("resnet18")
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
    model = randomized("resnet20")
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
    model = randomized("resnet20")
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
    model = randomized("resnet20").train()
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
    model = randomized("resnet20")
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
        prune_model(randomized("resnet32"), table, table.channels)
    with pytest.raises(NpsError, match="does not match"):
        prune_model(build_model("resnet20", num_classes=100), table, table.channels)
    with pytest.raises(NpsError, match="does not match"):
        prune_model(build_model("resnet20", num_classes=10, in_channels=1), table, table.channels)
    with torch.device("meta"):
        meta = build_model("resnet20", num_classes=10)
    with pytest.raises(NpsError, match="meta"):
        prune_model(meta, table, table.channels, criterion="l2")
