"""The kernels package must import, pick tiles and run the reference on a machine without Triton
(a CPU-only ComfyUI with `force_reference`)."""

import subprocess
import sys
import textwrap


def test_reference_path_and_tiles_work_when_triton_cannot_be_imported():
    script = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None          # any `import triton` now raises ImportError
        import torch
        from sparse_vdit import kernels
        from sparse_vdit.strategies import Diagonal, VideoGeometry, compile_layer
        assert kernels.preferred_tiles(128, "cpu") == (64, 64)
        q = torch.randn(1, 1, 40, 64)
        assert kernels.supports(q) is not None
        geom = VideoGeometry(frames=2, height=4, width=5)
        plan = compile_layer((Diagonal(0.5),), geom, block_m=64, block_n=64, device="cpu")
        out = plan.run(q, q, q, layout="bhld", backend="reference")
        assert out.shape == q.shape and torch.isfinite(out).all()
        from sparse_vdit.kernels.rotary import rotate_pairs
        assert torch.equal(rotate_pairs(q.transpose(1, 2), torch.ones(40, 64), torch.zeros(40, 64)), q.transpose(1, 2))
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")
