"""Sparse attention kernels: the rule, the tables, the torch reference and the Triton kernel
(under TRITON_INTERPRET on the CPU) against a float64 masked softmax built from rule_mask."""

import math
import random

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from sparse_vdit.kernels import (KernelTables, rule_mask, sparse_attention, sparse_attention_reference,
                                 supports, tables_from_rules)
from sparse_vdit.kernels import rule as R
from sparse_vdit.kernels.rule import make_rule
from sparse_vdit.kernels.tables import q_tile_bounds
from sparse_vdit.kernels.triton_attention import (_box_pass, _divmod, _q_tile_rows, _work_item, box_layouts,
                                                  launch_sparse_attention, work_order)


def random_rule(rng: random.Random, F: int, H: int, W: int, kind: str):
    P, N = H * W, F * H * W
    order = rng.choice([R.FRAME_MAJOR, R.SPACE_MAJOR, R.CUBE])
    if kind == "skip":
        return make_rule(order=R.SKIP_HEAD)
    if kind == "dense":
        return make_rule(order=order, diag=N)
    if kind == "diag":
        return make_rule(order=order, diag=rng.randint(0, 2 * P))
    if kind == "md":
        return make_rule(order=order, md=(rng.randint(0, P // 2), rng.randint(0, F)))
    if kind == "win":
        return make_rule(order=order, win=(rng.randint(0, F - 1), rng.randint(0, H // 2), rng.randint(0, W // 2)))
    if kind == "stripe":
        a = rng.randint(0, N - 2)
        return make_rule(order=order, stripe=rng.randint(0, P), cols=[(a, rng.randint(a + 1, N))])
    if kind == "mix":
        c = sorted(rng.sample(range(N), 6))
        return make_rule(order=order, diag=rng.randint(0, P), md=(rng.randint(0, 3), rng.randint(0, 2)),
                         win=(1, 1, rng.randint(0, 2)), stripe=rng.randint(0, 4),
                         cols=[(c[0], c[1]), (c[2], c[3]), (c[4], c[5])])
    raise AssertionError(kind)


def float64_attention(q, k, v, rules, geom, layout, kv_len, scale):
    """Dense float64 masked softmax from rule_mask (empty rows give 0), in [B, H, L, D]."""
    if layout == "blhd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    L = q.shape[2]
    idx = torch.arange(L)
    mask = rule_mask(torch.tensor(rules), *geom, idx, idx)[None]  # [1, H, L, L]
    if kv_len is not None:
        mask = mask & (idx[None, :] < kv_len.long()[:, None])[:, None, None, :]
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    p = s.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
    return p @ v.double()


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ---- the rule -----------------------------------------------------------------------------------

def _spec_mask(rule, prefix, F, H, W, L):
    """The DESIGN.md 3 rule written out pair by pair (slow; tiny sizes)."""
    P, N = H * W, F * H * W
    out = torch.zeros(L, L, dtype=torch.bool)
    if rule[R.ORDER] == R.SKIP_HEAD:
        return out
    for i in range(L):
        for j in range(L):
            gi, gj = i - prefix, j - prefix
            if not (0 <= gi < N and 0 <= gj < N) or i == j:
                out[i, j] = True
                continue
            fi, si, fj, sj = gi // P, gi % P, gj // P, gj % P
            ok = rule[R.DIAG] >= 0 and abs(gi - gj) <= rule[R.DIAG]
            ok |= rule[R.MD_S] >= 0 and abs(si - sj) <= rule[R.MD_S] and abs(fi - fj) <= rule[R.MD_T]
            ok |= (rule[R.WIN_F] >= 0 and abs(fi - fj) <= rule[R.WIN_F]
                   and abs(si // W - sj // W) <= rule[R.WIN_Y] and abs(si % W - sj % W) <= rule[R.WIN_X])
            ok |= gj < rule[R.STRIPE_FIRST]
            ok |= any(rule[R.COLS + 2 * c] <= gj < rule[R.COLS + 2 * c + 1] for c in range(rule[R.N_COLS]))
            out[i, j] = ok
    return out


@pytest.mark.parametrize("kind", ["skip", "dense", "diag", "md", "win", "stripe", "mix"])
def test_rule_mask_matches_the_written_rule(kind):
    rng = random.Random(hash(kind) % 1000)
    prefix, F, H, W, suffix = 2, 3, 3, 4, 1
    L = prefix + F * H * W + suffix
    rule = random_rule(rng, F, H, W, kind)
    idx = torch.arange(L)
    got = rule_mask(rule, prefix, F, H, W, idx, idx)
    assert torch.equal(got, _spec_mask(rule, prefix, F, H, W, L))
    rows = torch.tensor([5, 0, L - 1])
    assert torch.equal(rule_mask([rule, rule], prefix, F, H, W, rows, idx)[1], got[rows])


def test_physical_logical_maps_are_inverse_permutations():
    prefix, F, H, W, L = 3, 4, 3, 5, 3 + 60 + 2
    p = torch.arange(L)
    for order in (R.FRAME_MAJOR, R.SPACE_MAJOR, R.CUBE):
        lg = R.physical_to_logical(p, order, prefix, F, H, W)
        assert torch.equal(torch.sort(lg).values, p)
        assert torch.equal(R.logical_to_physical(lg, order, prefix, F, H, W), p)
    lg = R.physical_to_logical(p, R.SPACE_MAJOR, prefix, F, H, W)
    assert lg[prefix + 1].item() == prefix + H * W  # physical grid 1 = spatial 0 of frame 1
    assert torch.equal(lg[:prefix], p[:prefix]) and torch.equal(lg[-2:], p[-2:])


@pytest.mark.parametrize("F,H,W", [(2, 11, 10), (1, 8, 16), (3, 5, 3), (1, 17, 9)])
def test_cube_order_walks_8x8_cubes_frame_by_frame(F, H, W):
    """Cube order written out cube by cube (ragged cubes at the bottom/right edges)."""
    want = []
    for f in range(F):
        for cy in range(0, H, 8):
            for cx in range(0, W, 8):
                want += [f * H * W + y * W + x for y in range(cy, min(cy + 8, H)) for x in range(cx, min(cx + 8, W))]
    assert R.cube_order_map(F, H, W).tolist() == want
    prefix, L = 2, 2 + F * H * W + 3
    lg = R.physical_to_logical(torch.arange(L), R.CUBE, prefix, F, H, W)
    assert lg[prefix:prefix + F * H * W].tolist() == [prefix + g for g in want]
    assert lg[:prefix].tolist() == [0, 1] and lg[-3:].tolist() == [L - 3, L - 2, L - 1]


def test_rule_mask_rejects_bad_rules_and_geometry():
    idx = torch.arange(4)
    with pytest.raises(ValueError, match="16 ints"):
        rule_mask([0] * 15, 0, 1, 2, 2, idx, idx)
    with pytest.raises(ValueError, match="integers"):
        rule_mask(torch.zeros(16), 0, 1, 2, 2, idx, idx)
    with pytest.raises(ValueError, match="geometry"):
        rule_mask(make_rule(diag=1), 0, 0, 2, 2, idx, idx)


# ---- tables -------------------------------------------------------------------------------------

def _tables(**over):
    t = tables_from_rules([make_rule(diag=3), make_rule(order=R.SKIP_HEAD)], 1, 2, 3, 4, 27, 16, 16)
    for key, val in over.items():
        setattr(t, key, val)
    return t


@pytest.mark.parametrize("over, match", [
    (dict(head_rules=torch.zeros(2, 15, dtype=torch.int32)), "head_rules"),
    (dict(runs=torch.zeros(3, 3, dtype=torch.int64)), "int32"),
    (dict(row_ptr=torch.zeros(2, 2, dtype=torch.int32)), "row_ptr"),
    (dict(block_m=48), "power of two"),
    (dict(seq_len=20), "seq_len"),
    (dict(frames=0), "geometry"),
    (dict(prefix=1.0), "int"),
    (dict(masked_percent=101), "masked_percent"),
    (dict(masked_percent=12.5), "masked_percent"),
])
def test_tables_validate_rejects_bad_fields(over, match):
    with pytest.raises(ValueError, match=match):
        _tables(**over).validate()


def test_tables_count_the_masked_share_of_the_heads_they_run():
    # what picks the kernel on the GPU (triton_attention._gluon_mode): partial tiles over visited tiles
    rng = random.Random()
    F, H, W = 2, rng.randint(3, 6), rng.randint(3, 7)
    window, band = make_rule(win=(0, 1, 1)), make_rule(diag=rng.randint(32, 64))  # the band has full tiles
    t = tables_from_rules([window, band, make_rule(order=R.SKIP_HEAD), window], 0, F, H, W, F * H * W, 16, 16)
    row_ptr, runs = t.row_ptr.tolist(), t.runs.tolist()
    visited = masked = 0
    for rule in t.head_rules.tolist():
        if rule[R.ORDER] == R.SKIP_HEAD:
            continue
        for a, b, full in runs[row_ptr[rule[R.ROW_BASE]]:row_ptr[rule[R.ROW_BASE] + t.num_q_tiles]]:
            visited, masked = visited + b - a, masked + (b - a) * (1 - full)
    assert t.masked_percent == round(100 * masked / visited) and 0 < t.masked_percent < 100
    assert tables_from_rules([make_rule(order=R.SKIP_HEAD)], 0, F, H, W, F * H * W, 16, 16).masked_percent == 0


def test_tables_validate_contents():
    t = _tables()
    t.validate(check_contents=True)
    bad = t.runs.clone()
    bad[0, 1] = t.num_k_tiles + 1
    with pytest.raises(ValueError, match="runs"):
        KernelTables(t.head_rules, t.row_ptr, bad, 1, 2, 3, 4, 27, 16, 16).validate(check_contents=True)
    rules = t.head_rules.clone()
    rules[0, R.ROW_BASE] = 5
    with pytest.raises(ValueError, match="ROW_BASE"):
        KernelTables(rules, t.row_ptr, t.runs, 1, 2, 3, 4, 27, 16, 16).validate(check_contents=True)


@pytest.mark.parametrize("segment", [True, False])
def test_tile_oracle_classifies_every_tile(segment):
    rng = random.Random(3)
    prefix, F, H, W, L, bm, bn = 2, 3, 4, 5, 2 + 60 + 3, 32, 16
    rules = [random_rule(rng, F, H, W, kind) for kind in ("diag", "md", "win", "stripe")]
    t = tables_from_rules(rules, prefix, F, H, W, L, bm, bn, segment_q_tiles=segment)
    bounds = t.q_bounds.tolist()
    assert t.num_q_tiles == (4 if segment else 3)  # segment-aligned: 2 text rows, 60 grid rows in 2, 3 text rows
    for h, rule in enumerate(rules):
        phys = torch.arange(L)
        lg = R.physical_to_logical(phys, rule[R.ORDER], prefix, F, H, W)
        m = rule_mask(rule, prefix, F, H, W, lg, lg)  # physical x physical
        base = t.head_rules[h, R.ROW_BASE].item()
        for qt in range(t.num_q_tiles):
            want = {}
            for kt in range(t.num_k_tiles):
                blk = m[bounds[qt]:bounds[qt + 1], kt * bn:(kt + 1) * bn]
                if blk.any():
                    want[kt] = int(blk.all())
            got = {}
            for r in range(t.row_ptr[base + qt].item(), t.row_ptr[base + qt + 1].item()):
                a, b, full = t.runs[r].tolist()
                got.update({kt: full for kt in range(a, b)})
            assert got == want


# ---- attention ----------------------------------------------------------------------------------

CASES = [
    # (seed, prefix, F, H, W, suffix, heads kinds, D, layout, block_m, block_n, kv_cut)
    (1, 3, 3, 5, 7, 4, ["diag", "md", "skip", "win"], 64, "bhld", 32, 32, False),
    (2, 0, 4, 3, 5, 0, ["stripe", "dense", "mix"], 64, "blhd", 16, 32, True),
    (3, 5, 2, 7, 3, 0, ["mix", "win", "md"], 128, "bhld", 32, 32, True),
    (4, 0, 3, 4, 3, 9, ["diag", "skip", "stripe"], 128, "blhd", 16, 16, False),
]


@pytest.mark.parametrize("segment", [True, False], ids=["segment_q_tiles", "uniform_q_tiles"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{c[0]}" for c in CASES])
def test_kernel_and_reference_match_float64(case, segment):
    seed, prefix, F, H, W, suffix, kinds, D, layout, bm, bn, kv_cut = case
    if not segment and prefix == suffix == 0:
        pytest.skip("without text both tilings are the same")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    L = prefix + F * H * W + suffix
    rules = [random_rule(rng, F, H, W, kind) for kind in kinds]
    tables = tables_from_rules(rules, prefix, F, H, W, L, bm, bn, segment_q_tiles=segment)
    B, nh = 2, len(rules)
    shape = (B, nh, L, D) if layout == "bhld" else (B, L, nh, D)
    q, k, v = (torch.randn(shape) for _ in range(3))
    kv_len = torch.tensor([L, rng.randint(L // 3, L - 1)], dtype=torch.int32) if kv_cut else None
    scale = 1.0 / math.sqrt(D)
    want = float64_attention(q, k, v, rules, (prefix, F, H, W), layout, kv_len, scale)

    out = torch.full(shape, float("nan"))
    active, skip = tables.launch_heads()[:2]
    launch_sparse_attention(q, k, v, out, tables.head_rules, tables.row_ptr, tables.runs, active, skip,
                            kv_len, tables.cube_map, [prefix, F, H, W], bm, bn, layout, scale,
                            segment_q_tiles=segment)
    assert not out.isnan().any(), "kernel left output unwritten"
    ref = sparse_attention_reference(q, k, v, tables, layout, kv_len, scale)
    for got in (out, ref):
        got_bhld = got if layout == "bhld" else got.transpose(1, 2)
        assert got.shape == shape and got.dtype == q.dtype
        assert rel_err(got_bhld, want) <= 1e-5
        for h, kind in enumerate(kinds):
            if kind == "skip":
                assert torch.equal(got_bhld[:, h], torch.zeros_like(got_bhld[:, h]))


def test_cube_order_heads_mixed_with_other_orders(monkeypatch):
    # H not a multiple of 8, prefix and suffix segments; kv_len cut mid-frame and in the prefix.
    # Head 0's tiles are skipped, partial and full, so a wrong map or kv cut changes the result.
    prefix, F, H, W, suffix, D, bm, bn = 3, 1, 9, 24, 2, 64, 16, 16
    L = prefix + F * H * W + suffix
    rules = [make_rule(order=R.CUBE, win=(0, 7, 7)), make_rule(order=R.SKIP_HEAD),
             make_rule(order=R.CUBE, win=(0, 1, 2), stripe=12, cols=[(150, 170)]),
             make_rule(order=R.SPACE_MAJOR, md=(4, 1)), make_rule(order=R.CUBE, diag=5, md=(2, 0), win=(0, 4, 4)),
             make_rule(order=R.FRAME_MAJOR, md=(3, -1), win=(0, -1, 2), stripe=5)]  # negative radii: empty parts
    tables = tables_from_rules(rules, prefix, F, H, W, L, bm, bn)
    runs0 = tables.runs[tables.row_ptr[1]:tables.row_ptr[2]]  # head 0, second q-tile
    assert runs0[:, 2].any() and (runs0[:, 2] == 0).any() and (runs0[:, 1] - runs0[:, 0]).sum() < tables.num_k_tiles - 2
    torch.manual_seed(7)
    q, k, v = (torch.randn(2, len(rules), L, D) for _ in range(3))
    kv_len = torch.tensor([80, 2], dtype=torch.int32)
    want = float64_attention(q, k, v, rules, (prefix, F, H, W), "bhld", kv_len, D ** -0.5)
    for backend, merged in (("triton", "1"), ("triton", "0"), ("reference", "1")):
        monkeypatch.setenv("SPARSE_VDIT_MERGED_CUBE", merged)
        out = sparse_attention(q, k, v, tables, kv_len=kv_len, backend=backend)
        assert rel_err(out, want) <= 1e-5, (backend, merged)
        assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    # the kernel needs the map for cube-order heads
    bare = KernelTables(tables.head_rules, tables.row_ptr, tables.runs, prefix, F, H, W, L, bm, bn)
    with pytest.raises(ValueError, match="cube_map"):
        sparse_attention(q, k, v, bare, kv_len=kv_len)
    with pytest.raises(ValueError, match="cube_map"):
        bare.validate(check_contents=True)


def test_rows_with_no_key_are_zero_not_nan():
    # diagonal of half-width 0 and no prefix: grid queries past kv_len have nothing left to attend
    F, H, W = 2, 4, 4
    L = F * H * W
    tables = tables_from_rules([make_rule(diag=0)], 0, F, H, W, L, 16, 16)
    q, k, v = (torch.randn(1, 1, L, 64) for _ in range(3))
    kv_len = torch.tensor([10], dtype=torch.int32)
    for backend in ("triton", "reference"):
        out = sparse_attention(q, k, v, tables, kv_len=kv_len, backend=backend)
        assert torch.equal(out[0, 0, 10:], torch.zeros(L - 10, 64))
        assert torch.allclose(out[0, 0, :10], v[0, 0, :10], atol=1e-6)


def test_kernel_reads_the_full_flags():
    # a q-tile's partial k-tile marked full lets masked pairs in: the result must change
    prefix, F, H, W = 0, 2, 4, 8
    L = F * H * W
    tables = tables_from_rules([make_rule(diag=5)], prefix, F, H, W, L, 16, 16)
    q, k, v = (torch.randn(1, 1, L, 64) for _ in range(3))
    good = sparse_attention(q, k, v, tables)
    assert (tables.runs[:, 2] == 0).any()
    runs = tables.runs.clone()
    runs[:, 2] = 1
    forged = KernelTables(tables.head_rules, tables.row_ptr, runs, prefix, F, H, W, L, 16, 16)
    bad = sparse_attention(q, k, v, forged)
    assert rel_err(bad, good.double()) > 1e-2
    dense = float64_attention(q, k, v, [make_rule(diag=L)], (prefix, F, H, W), "bhld", None, 64 ** -0.5)
    assert rel_err(good, dense) > 1e-2  # the band really is sparse


def _inputs(L=27, H=2, D=64, layout="bhld"):
    shape = (1, H, L, D) if layout == "bhld" else (1, L, H, D)
    return [torch.randn(shape) for _ in range(3)]


@pytest.mark.parametrize("mutate, match", [
    (lambda q, k, v, t: (q, k[:, :, :-1], v, t, {}), "k shape"),
    (lambda q, k, v, t: (q, k, v.double(), t, {}), "v dtype"),
    (lambda q, k, v, t: (q[:, :1], k[:, :1], v[:, :1], t, {}), "heads"),
    (lambda q, k, v, t: (q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], t, {}), "sequence length"),
    (lambda q, k, v, t: (q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3), t, {}), "contiguous"),
    (lambda q, k, v, t: (q[0], k[0], v[0], t, {}), "4-D"),
    (lambda q, k, v, t: (q, k, v, t, {"layout": "bshd"}), "layout"),
    (lambda q, k, v, t: (q, k, v, t, {"backend": "cuda"}), "backend"),
    (lambda q, k, v, t: (q, k, v, t, {"kv_len": torch.tensor([5])}), "kv_len"),
    (lambda q, k, v, t: (q, k, v, t, {"kv_len": torch.tensor([5, 5], dtype=torch.int32)}), "kv_len"),
    (lambda q, k, v, t: (q.double(), k.double(), v.double(), t, {}), "dtype"),
    (lambda q, k, v, t: (q[..., :48], k[..., :48], v[..., :48], t, {}), "head_dim"),
])
def test_bad_inputs_raise_value_error(mutate, match):
    tables = tables_from_rules([make_rule(diag=3), make_rule(order=1, md=(1, 1))], 1, 2, 3, 4, 27, 16, 16)
    q, k, v, t, kw = mutate(*_inputs(), tables)
    with pytest.raises(ValueError, match=match):
        sparse_attention(q, k, v, t, **kw)


def test_supports_names_the_reason():
    assert supports(torch.randn(1, 1, 4, 64)) is None  # float32 under the CPU interpreter
    assert "dtype" in supports(torch.randn(1, 1, 4, 64, dtype=torch.float64))
    assert "head_dim" in supports(torch.randn(1, 1, 4, 80))
    assert "bfloat16" in supports(torch.randn(1, 1, 4, 64, dtype=torch.bfloat16))  # interpreter only


@triton.jit
def _divmod_kernel(X, Q, R, d, inv_d, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    q, r = _divmod(tl.load(X + offs), d, inv_d)
    tl.store(Q + offs, q)
    tl.store(R + offs, r)


@pytest.mark.parametrize("d", [1, 3, 41, 52, 85, 3600, 4080, 8191])  # 41: x * (1/d) alone is off
def test_kernel_index_division_is_exact(d):
    # the kernel divides indices in fp32; check every multiple of d and its neighbours up to 2**22
    mult = torch.arange(0, (1 << 22) // d + 1, max(1, (1 << 22) // d // 4000), dtype=torch.int64) * d
    x = torch.cat([mult - 1, mult, mult + 1, torch.randint(0, 1 << 22, (4096,))]).clamp(0, (1 << 22) - 1)
    x = torch.nn.functional.pad(x, (0, -len(x) % 1024)).to(torch.int32)
    q, r = torch.empty_like(x), torch.empty_like(x)
    _divmod_kernel[(len(x) // 1024,)](x, q, r, d, 1.0 / d, BLOCK=1024)
    assert torch.equal(q, x // d) and torch.equal(r, x % d)


@triton.jit
def _work_item_kernel(TILE, HEAD, START, END, n_active, q_cut1, q_cut2, n_q, n_lead, trail_start, L,
                      BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    q_tile, head = _work_item(pid, n_active, n_q, n_lead, trail_start)
    start, end = _q_tile_rows(q_tile, q_cut1, q_cut2, L, BLOCK_M)
    tl.store(TILE + pid, q_tile)
    tl.store(HEAD + pid, head)
    tl.store(START + pid, start)
    tl.store(END + pid, end)


@pytest.mark.parametrize("segment", [True, False])
@pytest.mark.parametrize("L, prefix, N, heads", [
    (700, 226, 400, 3),   # text first (CogVideoX-like), a grid ending mid-tile, a suffix
    (612, 0, 356, 2),     # text last (HunyuanVideo-like)
    (512, 0, 512, 2),     # no text: plain q-tile order
    (300, 130, 170, 4),   # no suffix, the grid ends inside the last tile
    (90, 40, 20, 1),      # prefix and suffix tiles meet
    (60, 10, 20, 2),      # one tile holds everything
])
def test_work_order_runs_text_tiles_first_and_covers_every_tile_once(L, prefix, N, heads, segment):
    block_m = 64
    order = work_order(prefix, N, L, block_m, segment)
    bounds = q_tile_bounds(prefix, N, L, block_m, segment)
    n_q = len(bounds) - 1
    assert order[2] == n_q and bounds[0] == 0 and bounds[-1] == L and (np.diff(bounds) <= block_m).all()
    if segment:  # no tile mixes rows of two segments
        assert all(not (a < c < b) for a, b in zip(bounds[:-1], bounds[1:]) for c in (prefix, prefix + N))
    else:
        assert list(bounds[:-1]) == list(range(0, L, block_m))
    tile, head, start, end = (torch.full((n_q * heads,), -1, dtype=torch.int32) for _ in range(4))
    _work_item_kernel[(n_q * heads,)](tile, head, start, end, heads, *order, L, BLOCK_M=block_m)
    items = list(zip(tile.tolist(), head.tolist()))
    assert sorted(items) == [(t, h) for t in range(n_q) for h in range(heads)]
    assert [(s, e) for s, e in zip(start.tolist(), end.tolist())] == [(bounds[t], bounds[t + 1]) for t, _ in items]
    has_text = [bounds[t] < prefix or bounds[t + 1] > prefix + N for t in range(n_q)]
    text_first = [has_text[t] for t, _ in items]
    assert text_first == sorted(text_first, reverse=True)
    grid_items = [(h, t) for t, h in items if not has_text[t]]
    assert grid_items == sorted(grid_items)  # each head's grid tiles in order, head after head


@triton.jit
def _window_box_kernel(QF, QY, QX, KF, KY, KX, DEAD, OUT, rf, ry, rx, y_shift, f_shift, guard,
                       BQ: tl.constexpr, BK: tl.constexpr):
    i, j = tl.arange(0, BQ), tl.arange(0, BK)
    qc = (tl.load(QF + i) << f_shift) | (tl.load(QY + i) << y_shift) | tl.load(QX + i)
    kc = (tl.load(KF + j) << f_shift) | (tl.load(KY + j) << y_shift) | tl.load(KX + j)
    radius = (rf << f_shift) | (ry << y_shift) | rx
    ok = _box_pass(qc, qc + radius + guard, kc, radius, guard, tl.load(DEAD + j) != 0)
    tl.store(OUT + i[:, None] * BK + j[None, :], ok.to(tl.int32))


@pytest.mark.parametrize("grid", [(21, 45, 80), (33, 45, 80), (11, 48, 85), (1, 2048, 2048), (4096, 32, 32)])
def test_packed_window_test_matches_coordinate_distances(grid):
    # the kernel's one-compare 3D window test on packed (f, y, x) codes, at real and extreme grids
    # (radii up to the dimension, coordinates at the edges) against |dq| <= r per axis
    F, H, W = grid
    y_shift, f_shift, guard, *_ = box_layouts(F, H, W)
    g = torch.Generator().manual_seed(F * H * W)
    n = 64

    def coords():
        c = [torch.randint(0, d, (n,), generator=g, dtype=torch.int32) for d in (F, H, W)]
        for axis, d in enumerate((F, H, W)):
            c[axis][:4] = torch.tensor([0, d - 1, 0, d - 1], dtype=torch.int32)
        return c

    q, k = coords(), coords()
    dead = (torch.rand(n, generator=g) < 0.1).to(torch.int32)
    for radii in [(0, 0, 0), (F - 1, H - 1, W - 1)] + [tuple(int(torch.randint(0, d, (1,), generator=g))
                                                           for d in (F, H, W)) for _ in range(4)]:
        out = torch.empty(n, n, dtype=torch.int32)
        _window_box_kernel[(1,)](*q, *k, dead, out, *radii, y_shift, f_shift, guard, BQ=n, BK=n)
        want = torch.ones(n, n, dtype=torch.bool)
        for a, b, r in zip(q, k, radii):
            want &= (a[:, None] - b[None, :]).abs() <= r
        want &= dead[None, :] == 0
        assert torch.equal(out.bool(), want), radii


def test_packed_codes_fit_32_bits_up_to_the_length_limit():
    # every grid under 2**22 tokens fits (field widths grow with log2 of each size)
    for F, H, W in [(1, 1, 1 << 21), (1 << 21, 1, 1), (1, 2048, 2047), (255, 127, 129), (63, 255, 255)]:
        assert F * H * W < 1 << 22
        y_shift, f_shift, guard, s_shift, md_guard = box_layouts(F, H, W)
        assert -(1 << 31) <= guard < 1 << 31 and -(1 << 31) <= md_guard < 1 << 31
    with pytest.raises(ValueError, match="too large"):
        box_layouts(1 << 12, 1 << 12, 1 << 12)


def test_autotuner_times_every_config_at_least_five_times():
    # Triton's default timer fills 100 ms, so it times a 150 ms config once; ours never fewer than 5
    from sparse_vdit.kernels import triton_attention as TA

    assert TA._sparse_attention_fwd.do_bench is TA._time_config
    assert [TA.tuning_repeats(ms) for ms in (150.0, 25.0, 19.9, 1.0, 0.5, 0.01)] == [5, 5, 6, 100, 100, 100]
    assert TA.tuning_repeats(0.0) == TA.tuning_repeats(float("nan")) == 100  # a zero estimate: the most
    assert TA.tuning_repeats(30.0, budget_ms=300.0, least=3, most=8) == 8


def test_tuned_config_name_says_warps_stages_path_walk_and_cap(monkeypatch):
    from sparse_vdit.kernels import triton_attention as TA

    monkeypatch.setattr(TA._sparse_attention_fwd, "best_config", None, raising=False)
    assert TA.tuned_config_name() == ""
    for config, name in ((triton.Config({"USE_TMA": True, "MERGED_CUBE": True}, num_warps=8, num_stages=3,
                                        maxnreg=128), "8x3 TMA merged r128"),
                         (triton.Config({"USE_TMA": True, "MERGED_CUBE": False, "PAIRED": True}, num_warps=8,
                                        num_stages=2), "8x2 TMA paired"),
                         (triton.Config({"USE_TMA": False, "MERGED_CUBE": False}, num_warps=4, num_stages=2),
                          "4x2 gathered")):
        monkeypatch.setattr(TA._sparse_attention_fwd, "best_config", config, raising=False)
        assert TA.tuned_config_name() == name


def test_cube_order_walk_is_tuned_only_where_cube_heads_read_copies(monkeypatch):
    # the autotuner times the merged cube-order walk only for launches with cube-order heads reading
    # copies (and TMA descriptors); the interpreter runs the walk the launch allows
    from sparse_vdit.kernels import triton_attention as TA

    configs = TA._autotune_configs()
    for has_desc, has_cube in ((0, 0), (1, 0), (1, 1)):
        kept = TA._prune_configs(configs, {"has_desc": has_desc, "has_cube_copies": has_cube, "paired_tiles": 1})
        assert any(not c.kwargs["USE_TMA"] for c in kept)
        assert any(c.kwargs["USE_TMA"] for c in kept) == bool(has_desc)
        assert any(c.kwargs["MERGED_CUBE"] for c in kept) == bool(has_cube)
    assert not any(c.kwargs["MERGED_CUBE"] and not c.kwargs["USE_TMA"] for c in configs)
    kept = TA._prune_configs(configs, {"has_desc": 1, "has_cube_copies": 2, "paired_tiles": 1})  # MERGED_CUBE=only
    assert kept and all(c.kwargs["MERGED_CUBE"] for c in kept)
    # the register cap (two CTAs an SM) is tuned for sparse layers at head_dim 64 only, with TMA and both walks
    for head_dim, bucket, capped in ((64, 1, True), (64, 4, True), (64, 0, False), (128, 1, False)):
        kept = TA._prune_configs(configs, {"has_desc": 1, "has_cube_copies": 1, "density_bucket": bucket,
                                           "paired_tiles": 1}, HEAD_DIM=head_dim)
        assert any(c.maxnreg == 128 for c in kept) == capped and any(c.maxnreg is None for c in kept)
    assert {c.kwargs["MERGED_CUBE"] for c in configs if c.maxnreg} == {False, True}
    assert not any(c.maxnreg and not c.kwargs["USE_TMA"] for c in configs)
    assert TA._parse_configs("8x3,4x2r96") == ((8, 3, None), (4, 2, 96))
    monkeypatch.setenv("SPARSE_VDIT_TRITON_CONFIGS", "8x3r128")  # only capped configs asked for: kept at d = 128
    capped_only = TA._autotune_configs()
    assert capped_only and all(c.maxnreg == 128 for c in capped_only)
    assert TA._prune_configs(capped_only, {"has_desc": 1, "has_cube_copies": 0, "paired_tiles": 1}, HEAD_DIM=128)
    monkeypatch.delenv("SPARSE_VDIT_TRITON_CONFIGS")
    launched = []
    original = TA._sparse_attention_fwd.fn

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **options):
                launched.append(options["MERGED_CUBE"])
                return original[grid](*args, **options)
            return launch

    monkeypatch.setattr(TA._sparse_attention_fwd, "fn", Spy())
    prefix, F, H, W = 2, 2, 9, 10
    L = prefix + F * H * W
    cube = tables_from_rules([make_rule(order=R.CUBE, win=(0, 2, 2)), make_rule(diag=9)], prefix, F, H, W, L, 16, 16)
    band = tables_from_rules([make_rule(diag=9), make_rule(order=R.SPACE_MAJOR, md=(1, 1))], prefix, F, H, W, L,
                             16, 16)
    q, k, v = (torch.randn(1, 2, L, 64) for _ in range(3))
    keys = []
    monkeypatch.setattr(TA, "_nearest_tuned", lambda key: keys.append(key[7]))  # the has_cube_copies key
    for tables, merged, want, key in ((cube, "1", True, 1), (cube, "only", True, 2), (cube, "0", False, 0),
                                      (band, "1", False, 0)):
        monkeypatch.setenv("SPARSE_VDIT_MERGED_CUBE", merged)
        with TA.reuse_tuned_configs():
            sparse_attention(q, k, v, tables)
        assert launched[-1] is want and keys[-1] == key


def test_paired_tiles_are_tuned_at_head_dim_128_with_tma_only():
    # full tiles two a step: never, tuned against single tiles (at head_dim 128; never faster at 64,
    # attention run J), or only them; at most 3 stages (a fourth overflows shared memory at d = 128)
    from sparse_vdit.kernels import triton_attention as TA

    configs = TA._autotune_configs()
    for paired, head_dim, want in ((0, 128, {False}), (1, 128, {False, True}), (1, 64, {False}), (2, 64, {True})):
        kept = TA._prune_configs(configs, {"has_desc": 1, "has_cube_copies": 0, "paired_tiles": paired,
                                           "density_bucket": 0}, HEAD_DIM=head_dim)
        assert {c.kwargs["PAIRED"] for c in kept if c.kwargs["USE_TMA"]} == want
        assert any(not c.kwargs["USE_TMA"] for c in kept)
        assert not any(c.kwargs["PAIRED"] and c.num_stages > 3 for c in kept)
    assert not any(c.kwargs["PAIRED"] and not c.kwargs["USE_TMA"] for c in configs)


def test_custom_op_traces_without_graph_break():
    tables = tables_from_rules([make_rule(diag=3), make_rule(order=R.SKIP_HEAD)], 1, 2, 3, 4, 27, 16, 16)
    q, k, v = _inputs()
    compiled = torch.compile(lambda q, k, v: sparse_attention(q, k, v, tables) * 2, fullgraph=True,
                             backend="eager")
    assert torch.equal(compiled(q, k, v), sparse_attention(q, k, v, tables) * 2)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        active, skip = tables.launch_heads()[:2]
        out = torch.ops.sparse_vdit.sparse_attention(
            fq, fk, fv, *(mode.from_tensor(t) for t in (tables.head_rules, tables.row_ptr, tables.runs,
                                                         active, skip)),
            None, None, [1, 2, 3, 4], 16, 16, "bhld", 0.125)
    assert out.shape == q.shape and out.dtype == q.dtype


def test_half_precision_inputs():
    dtype = torch.float16  # bfloat16 is checked on the GPU (tests/gpu): the interpreter gets it wrong
    prefix, F, H, W = 2, 2, 4, 5
    L = prefix + F * H * W
    rules = [make_rule(order=1, md=(2, 1)), make_rule(diag=7)]
    tables = tables_from_rules(rules, prefix, F, H, W, L, 16, 16)
    q, k, v = (torch.randn(1, 2, L, 64).to(dtype) for _ in range(3))
    want = float64_attention(q, k, v, rules, (prefix, F, H, W), "bhld", None, 0.125)
    for backend in ("triton", "reference"):
        out = sparse_attention(q, k, v, tables, backend=backend)
        assert out.dtype == dtype and rel_err(out, want) <= 1e-2


def test_all_skip_layer_is_zero_without_launch():
    tables = tables_from_rules([make_rule(order=R.SKIP_HEAD)] * 2, 0, 2, 2, 4, 16, 16, 16)
    assert tables.runs.shape == (0, 3)
    q, k, v = (torch.randn(1, 16, 2, 64) for _ in range(3))
    for backend in ("triton", "reference"):
        out = sparse_attention(q, k, v, tables, layout="blhd", backend=backend)
        assert torch.equal(out, torch.zeros_like(q))


def test_tables_made_under_inference_mode_run():
    # ComfyUI samples under torch.inference_mode: head rules made there have no version counter
    with torch.inference_mode():
        tables = tables_from_rules([make_rule(order=R.CUBE, win=(0, 1, 1)), make_rule(order=R.SKIP_HEAD)],
                                   1, 1, 4, 6, 27, 16, 16)
        q, k, v = _inputs()
        want = float64_attention(q, k, v, tables.head_rules.tolist(), (1, 1, 4, 6), "bhld", None, 0.125)
        for backend in ("triton", "reference"):
            assert rel_err(sparse_attention(q, k, v, tables, backend=backend), want) <= 1e-5


def test_tma_row_descriptors_cover_every_layout_or_decline():
    # frame-major full tiles load K/V through 2D descriptors whose rows are token rows
    from sparse_vdit.kernels.triton_attention import _row_descriptor

    B, L, H, D = 2, 40, 3, 64
    fused = torch.randn(B, L, 3 * H * D)  # q, k, v chunks of one projection: row stride 3*H*D
    k = fused[..., H * D:2 * H * D].view(B, L, H, D).transpose(1, 2)
    desc = _row_descriptor(k, 16)
    assert desc.shape == [(B - 1) * L + L, 3 * H * D] and desc.strides == [3 * H * D, 1]
    assert _row_descriptor(torch.randn(B, H, L, D), 16).shape == [B * H * L, D]
    odd = torch.randn(B * H * L * D + 1)[1:].view(B, H, L, D)  # 4-byte offset: not 16-byte aligned
    assert _row_descriptor(odd, 16) is None
    assert _row_descriptor(torch.randn(B, H, L, D + 8)[..., :D], 16) is not None  # padded rows
    assert _row_descriptor(torch.randn(B, H, D, L).transpose(2, 3), 16) is None  # D not contiguous


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_tma_and_gathered_loads_agree_on_strided_views(layout, monkeypatch):
    # frame-major heads (dense, band, stripes) take the TMA path, and so do space-major and
    # cube-order heads through copies of their K/V in their own order (three heads: three slots,
    # two orders); a misaligned view or SPARSE_VDIT_TMA=0 takes the gathered path: all must equal
    # the float64 answer
    from sparse_vdit.kernels import triton_attention as TA

    copies = []
    make_copies = TA._physical_order_copies
    monkeypatch.setattr(TA, "_physical_order_copies",
                        lambda *a: copies.append((a[2].tolist(), a[3].tolist())) or make_copies(*a))
    prefix, F, H, W, suffix, D, bm, bn = 5, 3, 4, 6, 7, 64, 16, 16
    L = prefix + F * H * W + suffix
    rules = [make_rule(diag=L), make_rule(order=R.SPACE_MAJOR, md=(1, 0), stripe=4), make_rule(diag=30),
             make_rule(order=R.CUBE, win=(1, 1, 2), cols=[(20, 30)]), make_rule(order=R.SPACE_MAJOR, md=(2, 1)),
             make_rule(stripe=3, cols=[(10, 40)])]
    tables = tables_from_rules(rules, prefix, F, H, W, L, bm, bn)
    assert tables.runs[:, 2].any()  # there are full tiles to fetch by TMA
    nh = len(rules)
    fused = torch.randn(2, L, 3 * nh * D)
    q, k, v = (c.reshape(2, L, nh, D) for c in fused.chunk(3, dim=-1))
    if layout == "bhld":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    kv_len = torch.tensor([L, L - 9], dtype=torch.int32)
    want = float64_attention(q, k, v, rules, (prefix, F, H, W), layout, kv_len, D ** -0.5)
    bhld = (lambda t: t) if layout == "bhld" else (lambda t: t.transpose(1, 2))
    # cube-order runs merged or one loop per run; full tiles by TMA two a step or one
    for tma, merged, paired in (("1", "1", "1"), ("1", "0", "0"), ("0", "1", "1")):
        monkeypatch.setenv("SPARSE_VDIT_TMA", tma)
        monkeypatch.setenv("SPARSE_VDIT_MERGED_CUBE", merged)
        monkeypatch.setenv("SPARSE_VDIT_PAIRED_TILES", paired)
        out = sparse_attention(q, k, v, tables, kv_len=kv_len, layout=layout)
        assert rel_err(bhld(out), want) <= 1e-5, (tma, merged, paired)
    assert copies == [([1, 3, 4], [1, 2, 1])] * 2  # made with descriptors only
    odd = torch.randn(fused.numel() + 1)[1:].view_as(fused)
    odd.copy_(fused)
    q2, k2, v2 = (c.reshape(2, L, nh, D) for c in odd.chunk(3, dim=-1))
    if layout == "bhld":
        q2, k2, v2 = (t.transpose(1, 2) for t in (q2, k2, v2))
    monkeypatch.setenv("SPARSE_VDIT_TMA", "1")
    out = sparse_attention(q2, k2, v2, tables, kv_len=kv_len, layout=layout)
    assert rel_err(bhld(out), want) <= 1e-5
