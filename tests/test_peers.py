"""benchmarks/bench_peers.py: the methods DiffusionBlocks is compared with train, and those that are exact
re-orderings of end-to-end training (checkpointing, block swapping, an offloaded optimizer) give its bits."""

import pytest
import torch

import dblocks_fast as dbf
from benchmarks import bench_memory, bench_peers
from dblocks_fast.tasks import DiTConfig, ImageGeneration

CPU = torch.device("cpu")
SPEC = dict(model="tiny", blocks=2, steps=2, batch_size=4, device="cpu")
# odd sizes: width 36 over 3 heads, 5 layers, 6x6 images in 3x3 patches, 7 classes
ODD = dict(image_size=6, channels=1, num_classes=7, hidden=36, heads=3, num_layers=5, patch_size=3)


def _setup(method: str, device=CPU, seed=0):
    torch.manual_seed(seed)
    data = bench_memory.random_images(ODD, 12)
    task = ImageGeneration(DiTConfig(**ODD))
    config = bench_peers.train_config({**SPEC, "method": method, "device": str(device)}, 1)
    return task, data, config, bench_peers.EndToEnd(task, data, config, method, device)


def _losses(run, steps=3):
    return [run.step(s).item() for s in range(steps)]


def _grads(run) -> list[dict]:
    """The gradients of steps 0 and 2: AdaLN-Zero starts with zero output heads and gates, so at step 0 only
    the heads get a gradient; two updates later every weight has a real one."""
    run.backward(0)
    first = run.grads()
    for s in (0, 1):
        if s:
            run.backward(s)
        run.opt.step()
        run.opt.zero_grad(set_to_none=True)
    run.backward(2)
    return [first, run.grads()]


def test_checkpointing_and_block_swapping_give_the_gradients_and_steps_of_end_to_end():
    task, data, config, ref = _setup("e2e")
    want = _grads(ref)
    attn = [g for n, g in want[1].items() if n.startswith("layers.0.attn")]
    assert attn and all(g.abs().sum() > 0 for g in attn)  # real gradients
    for method in ("e2e-ckpt", "e2e-swap"):
        got = _grads(_setup(method)[3])
        for step in (0, 1):
            assert got[step].keys() == want[step].keys()
            for name in want[step]:
                assert torch.equal(got[step][name], want[step][name]), (method, step, name)
    # whole steps: the same losses, bit for bit, as end to end (the update is the same AdamW), and as the
    # package's own Trainer at B = 1
    losses = _losses(_setup("e2e")[3])
    for method in ("e2e-ckpt", "e2e-swap"):
        assert _losses(_setup(method)[3]) == losses, method
    trainer = dbf.Trainer(task, data, config)
    assert [trainer.step(0).item() for _ in range(3)] == losses


def test_block_swapping_keeps_only_the_layers_in_use():
    run = _setup("e2e-swap")[3]
    sizes = []
    for layer in run.block.layers:
        layer.register_forward_hook(lambda m, a, o: sizes.append(_resident(run)))
    run.step(0)
    # after layer i's forward: layers i (or nothing, once freed) and i + 1 (prefetched) at most hold memory
    assert max(sizes) <= 2 and _resident(run) == 0  # and none after the backward
    assert all(p.untyped_storage().nbytes() == 0 for layer in run.block.layers for p in layer.parameters())


def _resident(run) -> int:
    return sum(any(p.untyped_storage().nbytes() for p in layer.parameters()) for layer in run.block.layers)


def test_checkpointing_inside_a_block_gives_the_blocks_bits():
    data = bench_memory.random_images(ODD, 12)
    config = bench_peers.train_config({**SPEC, "steps": 4, "method": "db"}, 2)
    config.layers = [3, 2]
    losses, weights = [], []
    for task in (
        ImageGeneration(DiTConfig(**ODD)),
        bench_peers.CheckpointedTask(ImageGeneration(DiTConfig(**ODD))),
    ):
        trainer = dbf.Trainer(task, data, config)
        # four steps a block: from the third on, every layer's gradient is real (see _grads)
        losses.append([trainer.step(b).item() for b in (0, 0, 0, 0, 1, 1, 1, 1)])
        weights.append([p.detach().clone() for p in trainer.model.parameters()])
    assert losses[0] == losses[1]
    assert all(torch.equal(a, b) for a, b in zip(*weights)) and len(weights[0]) > 0


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["e2e-swap", "e2e-ckpt", "e2e-offload", "e2e-offload-grads"])
def test_peers_give_the_gradients_of_end_to_end_on_the_gpu(method):
    if method.startswith("e2e-offload"):
        pytest.importorskip("torchao")
    cuda = torch.device("cuda")
    want = _grads(_setup("e2e", cuda)[3])
    got = _grads(_setup(method, cuda)[3])
    for name in want[0]:  # step 0: the same gradients, bit for bit
        assert torch.equal(got[0][name], want[0][name]), name
    # step 2 follows two updates: torchao's offload steps with torch's fused CPU AdamW and block swapping with
    # the CPU reference, where end to end runs the fused CUDA AdamW: equal to float32 rounding, not in bits
    for name in want[1]:
        if method == "e2e-ckpt":
            assert torch.equal(got[1][name], want[1][name]), name
        else:
            torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-4, atol=1e-6)
