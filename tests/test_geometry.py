"""VideoGeometry: derived sizes, validation of every field, sequence-length check."""

import numpy as np
import pytest

from sparse_vdit.strategies.geometry import VideoGeometry


def test_sizes_follow_the_layout():
    g = VideoGeometry(frames=3, height=5, width=7, prefix=2, suffix=11)
    assert g.tokens_per_frame == 35
    assert g.grid_tokens == 105
    assert g.seq_len == 2 + 105 + 11
    g.check_seq_len(118)


def test_defaults_have_no_segments_and_accept_numpy_ints():
    g = VideoGeometry(np.int64(2), 3, 4)
    assert (g.prefix, g.suffix, g.seq_len) == (0, 0, 24)
    assert type(g.frames) is int
    assert g == VideoGeometry(2, 3, 4) and hash(g) == hash(VideoGeometry(2, 3, 4))


@pytest.mark.parametrize("field,value", [("frames", 0), ("height", -1), ("width", 0), ("prefix", -2),
                                         ("suffix", -1), ("frames", 2.0), ("width", True), ("height", "4")])
def test_bad_fields_raise_naming_the_field(field, value):
    kwargs = dict(frames=2, height=3, width=4, prefix=1, suffix=1)
    kwargs[field] = value
    with pytest.raises(ValueError, match=field):
        VideoGeometry(**kwargs)


def test_seq_len_mismatch_names_both_numbers():
    g = VideoGeometry(2, 3, 4, prefix=5)
    with pytest.raises(ValueError, match=r"25.*29|29.*25"):
        g.check_seq_len(25)
