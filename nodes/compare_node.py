"""V3 node: dense vs sparse decoded frames -> PSNR / SSIM per frame, summary and plot."""

from __future__ import annotations

from comfy_api.latest import io, ui

from . import compare_frames
from .sockets import CATEGORY


class CompareVideos(io.ComfyNode):
    """How close the sparse run's frames are to the dense run's."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseVDiTCompare",
            display_name="Compare Dense vs Sparse",
            category=CATEGORY,
            description="PSNR and SSIM of every frame of the sparse video against the dense one.",
            inputs=[
                io.Image.Input("dense", tooltip="Frames decoded from the dense (unpatched) run."),
                io.Image.Input("sparse", tooltip="Frames decoded from the sparse run, same seed and size."),
            ],
            outputs=[io.String.Output(display_name="summary"), io.Image.Output(display_name="plot")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, dense, sparse):
        psnr = compare_frames.psnr_per_frame(dense, sparse)
        ssim = compare_frames.ssim_per_frame(dense, sparse)
        text = compare_frames.summary(psnr, ssim)
        per_frame = "\n".join(f"frame {i}: PSNR {p:.2f} dB, SSIM {s:.4f}" for i, (p, s) in enumerate(zip(psnr, ssim)))
        return io.NodeOutput(text, compare_frames.plot(psnr, ssim), ui=ui.PreviewText(f"{text}\n{per_frame}"))


NODES = [CompareVideos]
