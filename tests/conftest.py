import os

import pytest
import torch

# Triton kernels run on the CPU through its interpreter when there is no GPU (DESIGN.md section 6); this must
# be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def digits():
    from dblocks_fast.data import load_digits

    return load_digits("train")


@pytest.fixture
def tiny_task(digits):
    """A 3-layer DiT small enough that a training step takes a few milliseconds."""
    from dblocks_fast.tasks import ImageGeneration

    return ImageGeneration.for_data(digits, hidden=16, heads=2, num_layers=3, patch_size=4)


@pytest.fixture
def tiny_config(tmp_path):
    from dblocks_fast import TrainConfig

    def make(**kw):
        base = dict(
            num_blocks=3,
            steps_per_block=6,
            batch_size=8,
            warmup=2,
            log_every=2,
            ckpt_every=0,
            progress=False,
            device="cpu",
            out_dir=None,
        )
        return TrainConfig(**{**base, **kw})

    return make


from tests.kerneltest import poison_outputs  # noqa: E402, F401  (a fixture for every kernel test)
