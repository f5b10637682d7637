"""The one-pass RoPE kernel on the GPU, at the real sizes of Wan2.1-14B 720p and HunyuanVideo 720p: the
same bits as the torch math (so no fused multiply-add crept in), in bf16 and fp16."""

import pytest
import torch

from sparse_vdit.kernels.rotary import rotate_pairs, rotate_pairs_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("shape,select", [((1, 75600, 40, 128), "wan"), ((1, 118800, 24, 128), "per_channel"),
                                          ((2, 44880, 48, 64), "per_channel")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_gives_the_torch_bits_at_real_sizes(shape, select, dtype):
    B, L, H, D = shape
    g = torch.Generator(device="cuda").manual_seed(L + H)
    x = torch.randn(shape, device="cuda", dtype=dtype, generator=g)
    angle = torch.rand(L, D // 2, device="cuda", generator=g) * 50
    cos, sin = angle.cos().repeat_interleave(2, 1), angle.sin().repeat_interleave(2, 1)
    assert torch.equal(rotate_pairs(x, cos, sin, select), rotate_pairs_reference(x, cos, sin, select))
