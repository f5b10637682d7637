"""The testbed's training data drawn on the GPU: the same videos as on the CPU."""

import pytest
import torch

from sparse_vdit.testbed.data import prompt_embeddings, training_batch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_training_batch_on_the_gpu_matches_the_cpu():
    # draws are made on the CPU and reach the GPU through pinned copies, expanded views included
    cpu, prompts = training_batch(6, torch.Generator().manual_seed(3), "cpu")
    gpu, same_prompts = training_batch(6, torch.Generator().manual_seed(3), "cuda")
    assert same_prompts == prompts and gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
    assert torch.equal(prompt_embeddings(prompts, "cuda").cpu(), prompt_embeddings(prompts))
