"""Sparse attention on the GPU in bf16 at real frame sizes, against float32 on sampled rows: the Triton
kernel in every test (SPARSE_VDIT_GLUON=0, although the product runs the Gluon kernel on sm_90 where
few tiles are masked), the Gluon kernel in `test_gluon_kernel_matches_float32` and
`test_gluon_kernel_fast_start_matches_float32`."""

import random

import pytest
import torch

from sparse_vdit.kernels import rule as R
from sparse_vdit.kernels import preferred_tiles, rule_mask, sparse_attention, tables_from_rules

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def _triton_kernel(monkeypatch):
    monkeypatch.setenv("SPARSE_VDIT_GLUON", "0")


def _layer_rules(F, H, W):
    """One head of every kind: band, spatial band (space-major), 3D windows (space-major and cube
    order), stripes, dense, skip."""
    P, N = H * W, F * H * W
    return [
        R.make_rule(diag=P // 2 + 37),
        R.make_rule(order=1, md=(P // 9, F)),
        R.make_rule(order=1, win=(1, H // 5, W // 6)),
        R.make_rule(stripe=P, cols=[(N // 2, N // 2 + 700)]),
        R.make_rule(diag=N),
        R.make_rule(order=R.SKIP_HEAD),
        R.make_rule(order=1, diag=P, md=(50, 1), win=(0, 3, 3), stripe=100),
        R.make_rule(order=R.CUBE, win=(1, H // 4, W // 5), stripe=P // 3),
    ]


GEOMS = [  # (prefix, F, H, W, suffix): Wan 480p, HunyuanVideo 720p (text last), CogVideoX 768p (text first)
    (0, 3, 30, 52, 0),
    (0, 3, 45, 80, 256),
    (226, 3, 48, 85, 0),
]


@pytest.mark.parametrize("geom", GEOMS, ids=["P1560", "P3600", "P4080"])
@pytest.mark.parametrize("head_dim, layout", [(128, "bhld"), (64, "blhd")])
def test_bf16_matches_float32_on_sampled_rows(geom, head_dim, layout):
    _check_layer(geom, head_dim, layout)


@pytest.mark.parametrize("head_dim, layout", [(128, "bhld"), (64, "blhd")])
def test_merged_cube_walk_matches_float32(head_dim, layout, monkeypatch):
    # the autotuner may never pick the merged cube-order walk above: force it
    monkeypatch.setenv("SPARSE_VDIT_MERGED_CUBE", "only")
    _check_layer(GEOMS[2], head_dim, layout)


@pytest.mark.parametrize("paired", ["0", "only"])
@pytest.mark.parametrize("head_dim, layout", [(128, "bhld"), (64, "blhd")])
def test_paired_and_single_full_tiles_match_float32(paired, head_dim, layout, monkeypatch):
    # the autotuner picks per layer whether full tiles go two a step: force each way
    monkeypatch.setenv("SPARSE_VDIT_PAIRED_TILES", paired)
    _check_layer(GEOMS[1], head_dim, layout)


@pytest.mark.parametrize("merged", ["0", "only"])
def test_register_capped_config_matches_float32(merged, monkeypatch):
    # the autotuner may never pick the d = 64 config capped at 128 registers (it spills): force it,
    # with each cube-order walk
    from sparse_vdit.kernels import triton_attention as TA

    monkeypatch.setenv("SPARSE_VDIT_TRITON_CONFIGS", "8x3r128")
    capped = TA._autotune_configs()
    monkeypatch.setattr(TA._sparse_attention_fwd, "configs", capped)
    monkeypatch.setattr(TA._sparse_attention_fwd, "cache", {})
    monkeypatch.setenv("SPARSE_VDIT_MERGED_CUBE", merged)
    _check_layer(GEOMS[2], 64, "blhd")
    assert TA._sparse_attention_fwd.best_config.maxnreg == 128


@pytest.mark.parametrize("tiles", [(128, 64), (128, 128)], ids=["128x64", "128x128"])
@pytest.mark.parametrize("geom", GEOMS, ids=["P1560", "P3600", "P4080"])
@pytest.mark.parametrize("head_dim, layout, mode", [(128, "bhld", "1"), (64, "blhd", "1"), (64, "blhd", "r128"),
                                                    (128, "bhld", "ws"), (64, "blhd", "ws")])
def test_gluon_kernel_matches_float32(geom, head_dim, layout, mode, tiles, monkeypatch):
    _check_gluon(geom, head_dim, layout, mode, tiles, monkeypatch)


@pytest.mark.parametrize("geom", GEOMS, ids=["P1560", "P3600", "P4080"])
@pytest.mark.parametrize("head_dim, layout, mode", [(64, "blhd", "r128"), (128, "bhld", "ws")])
def test_gluon_kernel_fast_start_matches_float32(geom, head_dim, layout, mode, monkeypatch):
    # each q-tile's walk started from vector loads of its runs, Q stored after the first K/V loads
    # (SPARSE_VDIT_GLUON_FAST_START=1, not yet the default)
    monkeypatch.setenv("SPARSE_VDIT_GLUON_FAST_START", "1")
    _check_gluon(geom, head_dim, layout, mode, (128, 64), monkeypatch)


def _check_gluon(geom, head_dim, layout, mode, tiles, monkeypatch):
    """`_check_layer` on the Gluon kernel of `mode`, checking it ran (not the Triton fallback)."""
    from sparse_vdit.kernels import gluon_attention as G

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernel is built for sm_90")
    monkeypatch.setenv("SPARSE_VDIT_GLUON", mode)
    launched = []
    real = G.launch_gluon
    monkeypatch.setattr(G, "launch_gluon", lambda *a: launched.append(real(*a)) or launched[-1])
    _check_layer(geom, head_dim, layout, tiles)
    assert launched and all(launched)  # the Gluon kernel ran, not the Triton fallback


def _check_layer(geom, head_dim, layout, tiles=None):
    """Every head of `_layer_rules` in bf16 against float32 on 384 sampled query rows."""
    prefix, F, H, W, suffix = geom
    L = prefix + F * H * W + suffix
    rules = _layer_rules(F, H, W)
    bm, bn = tiles or preferred_tiles(head_dim, "cuda")
    tables = tables_from_rules(rules, prefix, F, H, W, L, bm, bn, device="cuda")
    B, nh = 2, len(rules)
    shape = (B, nh, L, head_dim) if layout == "bhld" else (B, L, nh, head_dim)
    gen = torch.Generator(device="cuda").manual_seed(L + head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    kv_len = torch.tensor([L, L - (suffix // 2 if suffix else 1000)], dtype=torch.int32, device="cuda")
    out = sparse_attention(q, k, v, tables, layout=layout, kv_len=kv_len)
    assert not out.isnan().any()
    qb, kb, vb, ob = (t if layout == "bhld" else t.transpose(1, 2) for t in (q, k, v, out))
    rows = torch.tensor(sorted(random.Random(L).sample(range(L), 384)), device="cuda")
    keys = torch.arange(L, device="cuda")
    mask = rule_mask(rules, prefix, F, H, W, rows, keys)  # [H, rows, L]
    for b in range(B):
        m = mask & (keys < kv_len[b])[None, None, :]
        s = (qb[b][:, rows].float() @ kb[b].float().transpose(-1, -2)) * head_dim ** -0.5
        want = s.masked_fill(~m, float("-inf")).softmax(-1).nan_to_num(0.0) @ vb[b].float()
        got = ob[b][:, rows].float()
        for h, rule in enumerate(rules):
            if rule[R.ORDER] == R.SKIP_HEAD:
                assert torch.equal(got[h], torch.zeros_like(got[h]))
                continue
            err = ((got[h] - want[h]).norm() / want[h].norm()).item()
            assert err <= 1e-2, f"sample {b} head {h}: rel err {err}"


def test_autotune_timer_returns_the_asked_quantiles_of_real_launches():
    from sparse_vdit.kernels import triton_attention as TA

    x = torch.randn(4096, 4096, device="cuda")
    calls = []

    def call():
        calls.append(1)
        x @ x

    low, median, high = TA._time_config(call, quantiles=(0.2, 0.5, 0.8))
    assert 0 < low <= median <= high
    assert 2 + 5 <= len(calls) <= 2 + 100  # warm-up, estimate, then 5 to 100 timed calls
