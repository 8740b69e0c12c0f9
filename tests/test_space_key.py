"""Space keys: the one helper that writes and reads `<space>@<target>=<value>` (and `#top`), and its users."""
import math

import numpy as np
import pytest

from nps.kernels.spaces import SpaceKey, parse_space, parse_space_key, regime_key, space_key
from nps.pipeline.deploy.export import resolve_space
from nps.pipeline.results.report import space_regime


@pytest.mark.parametrize("name, target, value, top", [
    ("std-0.05", "c_flops", 0.25, False), ("mcb-0.9-1.1", "c_params", 0.1, True), ("uniform", "c_flops", 1e-05, False),
])
def test_written_keys_parse_back(name, target, value, top):
    key = space_key(name, target, value, top=top)
    parsed = parse_space_key(key)
    assert parsed == SpaceKey(name, target, value, top) and str(parsed) == key
    assert parsed.parent == space_key(name, target, value) and parsed.regime == regime_key(target, value)
    assert parsed.label == name + ("#top" if top else "")


def test_space_key_of_a_space_and_what_is_not_a_key():
    assert parse_space("std-0.05", "c_flops", 0.25).key == "std-0.05@c_flops=0.25"
    assert space_key("std-0.1", "c_flops", 0.1, top=True) == "std-0.1@c_flops=0.1#top"
    for text in ("std-0.05", "std-0.05@flops=0.25", "std-0.05@c_flops=", "a@c_flops=0.25#bottom", "x/y@c_flops=1"):
        assert parse_space_key(text) is None
    assert regime_key("c_flops", math.nan) == "c_flops"


def test_report_and_export_read_keys_the_same_way():
    assert space_regime("std-0.05@c_flops=0.25#top", {}) == ("std-0.05#top", "c_flops", 0.25)
    assert space_regime("old-group", {}) == ("old-group", "unspecified", space_regime("old-group", {})[2])
    assert np.isnan(space_regime("old-group", {})[2])
    spaces = ["std-0.05@c_flops=0.25", "std-0.05@c_flops=0.25#top", "std-0.1@c_flops=0.25"]
    assert resolve_space(spaces, "std-0.05") == "std-0.05@c_flops=0.25"
    assert resolve_space(spaces, "std-0.05#top") == "std-0.05@c_flops=0.25#top"
