"""bench/profile_layer.py: layer specs turn into per-head patterns, and bad specs name the problem."""

import pytest

from sparse_vdit.bench.profile_layer import layer_patterns
from sparse_vdit.strategies.geometry import VideoGeometry
from sparse_vdit.strategies.patterns import Dense


def test_layer_specs_give_one_pattern_per_head_at_the_asked_density():
    geometry = VideoGeometry(frames=5, height=7, width=9, prefix=3)
    assert layer_patterns("dense", geometry, 3) == (Dense(),) * 3
    patterns = layer_patterns("diagonal:0.3", geometry, 4)
    assert len(patterns) == 4 and len(set(patterns)) == 1
    assert abs(patterns[0].density(geometry) - 0.3) < 0.1


@pytest.mark.parametrize("spec", ["diagonal", "nope:0.1", "", "diagonal:"])
def test_bad_layer_specs_raise_naming_the_spec(spec):
    with pytest.raises(ValueError, match="expected 'dense' or FAMILY:DENSITY"):
        layer_patterns(spec, VideoGeometry(frames=2, height=3, width=4), 2)
