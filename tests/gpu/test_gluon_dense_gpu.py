"""bench/gluon_dense.py's Gluon prototype on an sm_90 GPU: dense attention against float32 SDPA, in every
block_n and schedule (schedule 2, warp-specialized, also run to run bit for bit), at lengths that leave the
last tile part full."""

import functools

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                                 reason="needs an sm_90 GPU")]


@functools.cache
def _case(shape):
    torch.manual_seed(sum(shape))
    q, k, v = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    return q, k, v, torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())


@pytest.mark.parametrize("shape", [(2, 3, 1000, 128), (1, 2, 128, 128), (1, 1, 77, 128), (1, 2, 3600, 128),
                                   (1, 3, 4306, 64)])
@pytest.mark.parametrize("block_n, stages", [(128, 2), (128, 3), (64, 2), (64, 3), (64, 4)])
@pytest.mark.parametrize("schedule", [0, 1])
def test_prototype_matches_sdpa(shape, block_n, stages, schedule):
    from sparse_vdit.bench.gluon_dense import attention

    q, k, v, ref = _case(shape)
    out = attention(q, k, v, block_n=block_n, stages=stages, schedule=schedule)
    assert torch.isfinite(out).all()
    assert ((out.float() - ref).abs().max() / ref.abs().max()).item() < 1e-2


@pytest.mark.parametrize("shape", [(2, 3, 1000, 128), (1, 2, 128, 128), (1, 1, 77, 128), (1, 2, 3600, 128),
                                   (1, 3, 4306, 64)])
@pytest.mark.parametrize("block_n, stages", [(128, 2), (128, 3), (64, 3), (64, 4), (64, 6)])
def test_warp_specialized_prototype_matches_sdpa(shape, block_n, stages):
    """Schedule 2: a loader warp fills the K/V ring through per-slot free / ready mbarriers (a wrong arrival
    count or phase hangs here; bench/gpu_session.sh time-boxes the run)."""
    from sparse_vdit.bench.gluon_dense import attention

    q, k, v, ref = _case(shape)
    out = attention(q, k, v, block_n=block_n, stages=stages, schedule=2)
    assert torch.isfinite(out).all()
    assert ((out.float() - ref).abs().max() / ref.abs().max()).item() < 1e-2


@pytest.mark.parametrize("head_dim, block_n, stages", [(128, 128, 2), (128, 128, 3), (64, 64, 4), (64, 128, 2)])
def test_warp_specialized_prototype_is_deterministic(head_dim, block_n, stages):
    """A loader that refilled a slot the consumers still read would change results from run to run."""
    from sparse_vdit.bench.gluon_dense import attention

    torch.manual_seed(head_dim + block_n + stages)
    q, k, v = (torch.randn(1, 16, 8190, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    first = attention(q, k, v, block_n=block_n, stages=stages, schedule=2)
    for _ in range(3):
        assert torch.equal(attention(q, k, v, block_n=block_n, stages=stages, schedule=2), first)
