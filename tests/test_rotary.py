"""RoPE in one pass (kernels/rotary.py): the Triton kernel (TRITON_INTERPRET on the CPU) gives the same
bits as the torch math, which gives the same bits as diffusers' own functions; bad input raises."""

import os

import pytest
import torch

from sparse_vdit.kernels.rotary import SELECTS, rotate_pairs, rotate_pairs_reference

needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                       reason="the Triton kernel needs a GPU or TRITON_INTERPRET=1")


def _tables(length: int, dim: int, generator, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (cos, sin) [L, D]: diffusers' repeat-interleaved angles, or any values per channel."""
    if interleaved:
        angle = torch.rand(length, dim // 2, generator=generator, dtype=torch.float64) * 100
        return angle.cos().float().repeat_interleave(2, 1), angle.sin().float().repeat_interleave(2, 1)
    return torch.randn(length, dim, generator=generator), torch.randn(length, dim, generator=generator)


@needs_interpreter
@pytest.mark.parametrize("select", SELECTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape,heads_first", [((2, 37, 3, 64), False), ((1, 19, 2, 128), True)])
def test_kernel_gives_the_torch_bits(select, dtype, shape, heads_first):
    g = torch.Generator().manual_seed(hash((select, str(dtype), shape)) % 2**31)
    B, L, H, D = shape
    x = torch.randn(B, H, L, D, generator=g).to(dtype).transpose(1, 2) if heads_first \
        else torch.randn(shape, generator=g).to(dtype)
    cos, sin = _tables(L, D, g, interleaved=select == "wan")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, cos, sin = x.to(device), cos.to(device), sin.to(device)
    expected = rotate_pairs_reference(x, cos, sin, select)
    assert torch.equal(rotate_pairs(x, cos, sin, select, use_kernel=True), expected)
    in_place = x.clone()
    assert rotate_pairs(in_place, cos, sin, select, out=in_place, use_kernel=True) is in_place
    assert torch.equal(in_place, expected)


@needs_interpreter
def test_kernel_under_torch_compile_gives_the_same_bits():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 21, 2, 64, generator=g).to(torch.float16)
    cos, sin = _tables(21, 64, g, interleaved=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, cos, sin = x.to(device), cos.to(device), sin.to(device)
    compiled = torch.compile(lambda x: rotate_pairs(x, cos, sin, "wan", use_kernel=True) * 1, backend="eager")
    assert torch.equal(compiled(x), rotate_pairs_reference(x, cos, sin, "wan"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_per_channel_matches_diffusers_apply_rotary_emb(dtype):
    from diffusers.models.embeddings import apply_rotary_emb

    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 23, 3, 64, generator=g).to(dtype)
    for interleaved in (True, False):
        cos, sin = _tables(23, 64, g, interleaved)
        stock = apply_rotary_emb(x, (cos, sin), sequence_dim=1)
        assert torch.equal(rotate_pairs(x, cos, sin, "per_channel"), stock)


def test_wan_reads_cos_of_the_even_and_sin_of_the_odd_channel():
    """Tables that differ within a pair show which entries each output reads (float64 check)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 5, 2, 8, generator=g, dtype=torch.float64)
    cos, sin = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    out = rotate_pairs(x.float(), cos, sin, "wan").double()
    even, odd = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None, 0::2].double(), sin[None, :, None, 1::2].double()
    torch.testing.assert_close(out[..., 0::2], even * c - odd * s, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[..., 1::2], even * s + odd * c, rtol=1e-6, atol=1e-6)


def test_tables_of_another_dtype_take_the_torch_math():
    """float64 tables make diffusers' products float64; the kernel (float32) must not take them."""
    from diffusers.models.embeddings import apply_rotary_emb

    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 9, 2, 64, generator=g).to(torch.bfloat16)
    cos, sin = (t.double() for t in _tables(9, 64, g, interleaved=False))
    stock = apply_rotary_emb(x, (cos, sin), sequence_dim=1)
    assert torch.equal(rotate_pairs(x, cos, sin, use_kernel=True), stock)


@pytest.mark.parametrize("bad,message", [
    (dict(select="hunyuan"), "select must be one of"),
    (dict(x=torch.zeros(1, 4, 2, 7)), "even D"),
    (dict(x=torch.zeros(4, 2, 8)), r"\[B, L, H, D\]"),
    (dict(cos=torch.zeros(5, 8)), r"cos and sin must be \[L, D\] = \[4, 8\]"),
    (dict(sin=torch.zeros(4, 4)), r"cos and sin must be \[L, D\]"),
    (dict(out=torch.zeros(1, 4, 2, 8, dtype=torch.float16)), "out must match x"),
])
def test_bad_input_names_the_problem(bad, message):
    args = dict(x=torch.zeros(1, 4, 2, 8), cos=torch.zeros(4, 8), sin=torch.zeros(4, 8), select="wan")
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        rotate_pairs(args["x"], args["cos"], args["sin"], args["select"], out=args.get("out"))
