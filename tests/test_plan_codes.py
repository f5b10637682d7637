"""Plan compiler's per-tile codes (0 not visited, 1 partial, 2 full) against per-key brute force."""

import numpy as np
import pytest
import torch

from sparse_vdit.kernels.rule import CUBE, FRAME_MAJOR, SPACE_MAJOR, physical_to_logical
from sparse_vdit.strategies.geometry import VideoGeometry
from sparse_vdit.strategies.patterns import Diagonal, LocalWindow, Union, VerticalStripe
from sparse_vdit.strategies.plan import _code_pieces, _key_code, _row_code

GEOMS = [VideoGeometry(3, 5, 7, prefix=2, suffix=3), VideoGeometry(4, 3, 5), VideoGeometry(2, 7, 3, prefix=21),
         VideoGeometry(3, 4, 9, suffix=40)]


def test_code_pieces_are_the_runs_of_one_nonzero_code():
    start, end, code = _code_pieces(np.array([0, 1, 1, 2, 0, 2, 2, 0, 0, 1, 0], np.int8))
    assert start.tolist() == [1, 3, 5, 9] and end.tolist() == [3, 4, 7, 10] and code.tolist() == [1, 2, 2, 1]
    assert all(a.size == 0 for a in _code_pieces(np.zeros(4, np.int8)))


@pytest.mark.parametrize("geom", GEOMS, ids=str)
@pytest.mark.parametrize("block", [16, 32])
def test_key_and_row_codes_match_per_key_brute_force(geom, block):
    L, N, pre = geom.seq_len, geom.grid_tokens, geom.prefix
    stripe, narrow = VerticalStripe(0.5, ((0.3, 0.4),)), VerticalStripe(0.3, ((0.6, 0.7),))
    for pattern, stripe, orders in ((Diagonal(0.3), None, [FRAME_MAJOR]), (stripe, stripe, [FRAME_MAJOR, SPACE_MAJOR]),
                                    (Union(LocalWindow(1, 0.3, 0.3), narrow), narrow, [FRAME_MAJOR, CUBE])):
        logical = np.ones(L, bool)  # keys every query attends: the non-grid ones and the stripes
        logical[pre: pre + N] = False
        for a, b in stripe.key_ranges(geom) if stripe else ():
            logical[pre + a: pre + b] = True
        for order in orders:
            keys = np.ones(-(-L // block) * block, bool)  # keys past L count for "all" only
            keys[:L] = logical[physical_to_logical(torch.arange(L), order, pre, geom.frames, geom.height,
                                                   geom.width).numpy()]
            some = [keys[t: min(t + block, L)].any() for t in range(0, L, block)]
            code = np.array(some) * (1 + keys.reshape(-1, block).all(axis=1))
            assert _key_code(pattern.head_rule(geom), order, geom, block).tolist() == code.tolist(), (pattern, order)
    non_grid = [(r < pre) | (r >= pre + N) for r in (np.arange(t, min(t + block, L)) for t in range(0, L, block))]
    assert _row_code(geom, block).tolist() == [int(m.any()) + int(m.all()) for m in non_grid]
