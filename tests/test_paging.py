"""Streamed sampling: blocks in host memory, at most two on the device, equal to the resident model."""

import copy

import pytest
import torch

import dblocks_fast as dbf
from dblocks_fast.model import BlockModel
from dblocks_fast.paging import StreamedBlockModel, flatten_module
from dblocks_fast.schedule import EDM


def _model(task, layers, seed=0):
    model = BlockModel.create(task, EDM(len(layers)), layers, seed=seed)
    with torch.no_grad():  # zero-initialised heads would make every block's output the same; perturb them
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("sampler,cfg", [("euler", 1.0), ("heun", 1.5)])
@pytest.mark.parametrize("layers", [[1, 1, 1], [1, 2]])
def test_streamed_sampling_equals_resident_bit_for_bit(tiny_task, layers, sampler, cfg):
    resident = _model(tiny_task, layers)
    streamed = StreamedBlockModel(copy.deepcopy(resident), device="cpu")
    seen = []

    def watch(info):
        seen.append(streamed.resident())

    labels = torch.tensor([0, 3, 7, 9, 1])
    steps = 2 * len(layers)
    a = dbf.sample(resident, labels, num_steps=steps, sampler=sampler, cfg_scale=cfg)
    b = dbf.sample(streamed, labels, num_steps=steps, sampler=sampler, cfg_scale=cfg, callback=watch)
    assert torch.equal(a, b)
    assert streamed.copies == len(layers)  # each block copied once: prefetch always guessed right
    # never more than two blocks of one architecture on the device (blocks of other depths have their own)
    assert all(len(r) <= 2 * len({*layers}) for r in seen)


def test_flatten_module_makes_every_tensor_a_view_of_one_buffer(tiny_task):
    block = _model(tiny_task, [3]).blocks[0]
    before = {k: v.clone() for k, v in block.state_dict().items()}
    flat = flatten_module(block, "cpu")
    # every tensor starts 64 elements into the buffer (the alignment of a tensor of its own), gaps are zeros
    assert flat.numel() == sum(-(-p.numel() // 64) * 64 for p in block.parameters())
    lo, hi = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
    for k, v in block.state_dict().items():
        assert torch.equal(v, before[k]) and lo <= v.data_ptr() < hi, k
        assert (v.data_ptr() - lo) % (64 * 4) == 0, k
    for p in block.parameters():
        p.data.fill_(0)
    assert (flat == 0).all()  # the views cover every nonzero element: the gaps are zeros
    flat.zero_()
    assert all((p == 0).all() for p in block.parameters())
    mixed = torch.nn.Linear(2, 2)
    mixed.bias.data = mixed.bias.data.double()
    with pytest.raises(TypeError, match="one dtype"):
        flatten_module(mixed, "cpu")


@pytest.mark.gpu
def test_streamed_sampling_on_cuda_equals_resident(tiny_task):
    resident = _model(tiny_task, [1, 1, 1])
    streamed = StreamedBlockModel(copy.deepcopy(resident), device="cuda")
    labels = torch.arange(10)
    a = dbf.sample(resident.to("cuda"), labels, num_steps=6, sampler="heun", cfg_scale=1.5)
    b = dbf.sample(streamed, labels, num_steps=6, sampler="heun", cfg_scale=1.5)
    assert torch.equal(a, b) and streamed.copies == 3
    assert all(t.is_pinned() for t in streamed._host)


# --- training with blocks paged to host memory or disk ----------------------------------------------------
def _tensors(trainer):
    out = {}
    for b in trainer.owned:
        for k, v in trainer.block_tensors(b).items():
            out[f"{b}/{k}"] = v.clone()
    return out


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.mark.parametrize("schedule", ["random", "sequential", "chunked"])
def test_host_and_disk_tiers_train_the_same_bits_as_resident(
    tiny_task, digits, tiny_config, tmp_path, schedule
):
    runs = {}
    for tier in ("none", "host", "disk"):
        cfg = tiny_config(offload=tier, schedule=schedule, chunk_steps=2, out_dir=str(tmp_path / tier))
        t = dbf.Trainer(tiny_task, digits, cfg)
        t.fit()
        runs[tier] = t
    ref = _tensors(runs["none"])
    for tier in ("host", "disk"):
        _assert_same(_tensors(runs[tier]), ref)
        # and the checkpoints written from each tier are the same files' contents
        _assert_same(
            {f"{b}/{k}": v for b in range(3) for k, v in _read(tmp_path / tier, b).items()},
            {f"{b}/{k}": v for b in range(3) for k, v in _read(tmp_path / "none", b).items()},
        )
    host = runs["host"].storage
    size = 4 * host.blocks[0].size  # bytes of a block's flat buffer
    if schedule == "sequential":
        assert host.bytes_in == 3 * size  # each block paged in once, prefetched before its turn
    assert host.bytes_in >= 3 * size and host.bytes_out >= 3 * size


def _read(run, b):
    from dblocks_fast import checkpoint

    return checkpoint.read_block(run, checkpoint.read_manifest(run), b)


def test_disk_tier_holds_no_block_in_memory_and_says_where_they_are(tiny_task, digits, tiny_config, tmp_path):
    t = dbf.Trainer(tiny_task, digits, tiny_config(offload="disk", out_dir=str(tmp_path / "run")))
    assert all(blk.host is None for blk in t.storage.blocks.values())
    assert sorted(p.name for p in (tmp_path / "run" / "paged").iterdir()) == [
        f"paged-block{b:03d}.safetensors" for b in range(3)
    ]
    for p in t.model.blocks[2].parameters():  # paged out: a zero-stride placeholder, not a copy
        assert p.stride() == (0,) * p.ndim
    model = t.fit()
    with pytest.raises(RuntimeError, match="offload='disk' and stays on disk; use dblocks_fast.load"):
        model.blocks[0](None)
    loaded = dbf.load(tmp_path / "run")  # the run folder holds every block, as with any tier
    dbf.sample(loaded, [1, 2], num_steps=3, device="cpu")


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_resume_in_the_middle_of_a_block_is_exact_in_every_tier(
    tiny_task, digits, tiny_config, tmp_path, tier
):
    full = dbf.Trainer(tiny_task, digits, tiny_config(schedule="sequential"))
    full.fit()

    class Stop(Exception):
        pass

    def stop(trainer, b):
        if sum(trainer.steps_done) == 9:  # saved at 8 steps: block 1 at its step 2 of 6
            raise Stop

    run = tmp_path / "run"
    cfg = tiny_config(schedule="sequential", offload=tier, out_dir=str(run), ckpt_every=2)
    with pytest.raises(Stop):
        dbf.Trainer(tiny_task, digits, cfg, callback=stop).fit()
    # resume in another tier: where blocks wait is not part of their numbers
    other = "disk" if tier == "host" else "host"
    cfg = tiny_config(schedule="sequential", offload=other, out_dir=str(run), ckpt_every=2)
    resumed = dbf.Trainer(tiny_task, digits, cfg, resume=True)
    assert resumed.steps_done == [6, 2, 0]
    resumed.fit()
    _assert_same(_tensors(resumed), _tensors(full))


def test_paged_storage_round_trips_and_a_failed_write_keeps_the_last_copy(tiny_task, tmp_path, monkeypatch):
    from dblocks_fast import checkpoint, storage

    block = _model(tiny_task, [3]).blocks[0]
    opt = torch.optim.AdamW(block.parameters())
    before = {f"param/{n}": p.detach().clone() for n, p in block.named_parameters()}
    store = storage.create("disk", torch.device("cpu"), folder=tmp_path)
    store.add(0, block, opt)
    got = store.tensors(0)
    for k, v in before.items():
        assert torch.equal(got[k], v), k
    assert all((got[k] == 0).all() for k in got if k.startswith("exp_avg"))
    path = tmp_path / "paged-block000.safetensors"
    good = path.read_bytes()
    store.activate(0)
    with torch.no_grad():
        block.pos_embed.add_(1.0)

    real = checkpoint.save_file

    def fail(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)  # half a write: the temporary file exists, then the disk fills
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        store._page_out(store.blocks[0].slot)
    assert path.read_bytes() == good and not list(tmp_path.glob("*.tmp"))


def test_preflight_refuses_what_does_not_fit_with_the_numbers(monkeypatch):
    from dblocks_fast import storage

    numels = [250_000_000] * 4  # 1B parameters in 4 blocks: 12 GB of weights and moments
    # the training block's gradients and their flat copy for the fused step: 8 bytes a parameter
    assert storage.needs("none", numels)["device"] == 12 * 10**9 + 8 * 250_000_000
    assert storage.needs("host", numels) == {"device": 8 * 10**9, "host": 12 * 10**9, "disk": 0}
    assert storage.needs("disk", numels) == {"device": 8 * 10**9, "host": 6 * 10**9, "disk": 15 * 10**9}
    monkeypatch.setattr(storage, "_host_available", lambda: 8 * 10**9)
    with pytest.raises(MemoryError, match=r"offload='host' does not fit 4 blocks \(1000.0M parameters") as e:
        storage.preflight("host", numels, torch.device("cpu"), None)
    assert "host: needs 20.00 GB, 8.00 GB free" in str(e.value) and "offload='disk' needs" in str(e.value)
    assert storage.preflight("host", [1000] * 4, torch.device("cpu"), None)["host"] > 0
    # a LoRA model: 1 MB of adapters and 2 GB of frozen base a block; the frozen bytes page with the blocks
    frozen = [2 * 10**9] * 4
    assert storage.needs("host", [250_000] * 4, frozen) == {"device": 2 * 2_003_000_000 + 2_000_000,
                                                           "host": 4 * 2_003_000_000, "disk": 0}  # fmt: skip
    assert storage.needs("disk", [250_000] * 4, frozen)["disk"] == 4 * 2_003_000_000 + 3_000_000
    with pytest.raises(MemoryError, match=r"and 8.00 GB of frozen weights\): host: needs 12.02 GB"):
        storage.preflight("host", [250_000] * 4, torch.device("cpu"), None, frozen=frozen)


def test_preflight_stops_training_before_anything_is_built(
    tiny_task, digits, tiny_config, tmp_path, monkeypatch
):
    from dblocks_fast import storage

    monkeypatch.setattr(storage, "_host_available", lambda: 1000)
    with pytest.raises(MemoryError, match="does not fit"):
        dbf.Trainer(tiny_task, digits, tiny_config(offload="host", out_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", ["random", "sequential"])
def test_paged_training_on_cuda_equals_resident(tiny_task, digits, tiny_config, tmp_path, schedule):
    runs = {}
    for tier in ("none", "host", "disk"):
        cfg = tiny_config(offload=tier, schedule=schedule, device="cuda", out_dir=str(tmp_path / tier))
        runs[tier] = dbf.Trainer(tiny_task, digits, cfg)
        runs[tier].fit()
    ref = _tensors(runs["none"])
    for tier in ("host", "disk"):
        _assert_same(_tensors(runs[tier]), ref)
    host, disk = runs["host"].storage, runs["disk"].storage
    assert host.pinned and all(blk.host.is_pinned() for blk in host.blocks.values())
    assert len(disk.copier.registered) == 1  # the disk tier pins its staging buffer only, never a passing one


def test_prefetch_off_pages_on_demand_with_the_same_bits(tiny_task, digits, tiny_config):
    ref = dbf.Trainer(tiny_task, digits, tiny_config())
    ref.fit()
    lazy = dbf.Trainer(tiny_task, digits, tiny_config(offload="host", prefetch=False))
    lazy.fit()
    _assert_same(_tensors(lazy), _tensors(ref))
    eager = dbf.Trainer(tiny_task, digits, tiny_config(offload="host", schedule="sequential"))
    eager.fit()
    size = 4 * eager.storage.blocks[0].size  # bytes of a block's flat buffer
    assert (
        eager.storage.bytes_in == 3 * size < lazy.storage.bytes_in
    )  # random order: paged in again and again


def test_a_cut_short_paged_file_is_an_error_not_garbage(tiny_task, tmp_path):
    from dblocks_fast import storage
    from dblocks_fast.checkpoint import CheckpointError

    store = storage.create("disk", torch.device("cpu"), folder=tmp_path)
    for b in range(2):
        block = _model(tiny_task, [3]).blocks[0]
        store.add(b, block, torch.optim.AdamW(block.parameters()))
    path = tmp_path / "paged-block001.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    store.activate(0)
    with pytest.raises(CheckpointError, match="is cut short .* resume the run from its last checkpoint"):
        store.activate(1)


def test_on_demand_paging_evicts_the_least_recently_active_block(tiny_task):
    from dblocks_fast import storage

    store = storage.create("host", torch.device("cpu"))
    for b in range(3):
        block = _model(tiny_task, [3]).blocks[0]
        store.add(b, block, torch.optim.AdamW(block.parameters()))
    size = 4 * store.blocks[0].size
    moved = []
    for b in (0, 1, 2, 0, 1, 2, 2, 1):
        before = (store.bytes_in, store.bytes_out)
        store.activate(b)
        moved.append((store.bytes_in - before[0], store.bytes_out - before[1]))
    # two slots: from the third activation on each new block evicts the one active before the last
    # (0 while 1 is kept, ...); a block still in its slot (2 again, then 1) moves nothing
    assert moved == [(size, 0), (size, 0)] + [(size, size)] * 4 + [(0, 0), (0, 0)]
    assert sorted(s.block.index for s in store.slots) == [1, 2]


@pytest.mark.gpu
def test_a_failed_pin_warns_and_leaves_cuda_usable():
    from dblocks_fast.paging import _pin, _unregister

    buf = torch.empty(1 << 20)
    assert _pin(buf)
    with pytest.warns(UserWarning, match="pinning .* failed"):
        assert not _pin(buf)  # already registered: the call fails and sets CUDA's last error
    x = torch.ones(1000, device="cuda")
    assert (x * 2).sum().item() == 2000  # the next kernel launch does not inherit that error
    _unregister([buf.data_ptr()])


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_a_block_of_odd_size_pages_with_aligned_parts_and_the_same_bits(tier, tmp_path):
    import copy

    from dblocks_fast import checkpoint, optim, storage

    torch.manual_seed(0)
    ref = torch.nn.Linear(5, 3)  # 18 parameters: the parts of its buffer are padded to 20 elements
    paged = copy.deepcopy(ref)
    ref_opt, opt = optim.AdamW(ref.parameters()), optim.AdamW(paged.parameters(), pack=False)
    store = storage.create(tier, torch.device("cpu"), folder=tmp_path)
    store.add(0, paged, opt)
    assert (store.blocks[0].numel, store.blocks[0].stride, store.blocks[0].size) == (18, 20, 60)
    x = torch.randn(4, 5)
    for _ in range(3):
        store.activate(0)
        parts = opt.flat()
        assert parts is not None and all(t.data_ptr() % 16 == 0 for t in parts)  # the vector path's condition
        for module, o in ((paged, opt), (ref, ref_opt)):
            module(x).square().sum().backward()
            o.step()
            o.zero_grad()
        store.flush()
    got, want = store.tensors(0), checkpoint.block_state(ref, ref_opt)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_frozen_weights_page_with_their_block_and_stay_where_the_tier_says(tier, tmp_path):
    """A LoRA-like block: a frozen bf16 base of odd sizes beside a trained fp32 adapter. The frozen bytes ride
    in the block's buffer (one copy pages both in), are never written back, and, paged out, live in the
    tier's home: the host buffer, or a file of their own on disk with no memory held."""
    import copy

    from dblocks_fast import checkpoint, optim, storage

    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3), torch.nn.LayerNorm(3))
    ref[0].to(torch.bfloat16).requires_grad_(False)  # 40 bf16 values: padded to 16-byte boundaries
    ref[2].requires_grad_(False)  # frozen fp32 too
    frozen_before = [p.detach().clone() for p in optim.frozen(ref)]
    paged = copy.deepcopy(ref)
    ref_opt = optim.AdamW([p for _, p in optim.trained(ref)])
    opt = optim.AdamW([p for _, p in optim.trained(paged)], pack=False)
    store = storage.create(tier, torch.device("cpu"), folder=tmp_path)
    store.add(0, paged, opt)
    blk = store.blocks[0]
    assert blk.fsize * 4 == 80 + 16 + 16 + 16  # 70 and 10 bytes of bf16, 12 and 12 of fp32: each to 16 bytes
    x = torch.randn(4, 7)
    for _ in range(3):
        store.activate(0)
        for module, o in ((paged, opt), (ref, ref_opt)):
            module[2](module[1](module[0](x.to(torch.bfloat16)).float())).square().sum().backward()
            o.step()
            o.zero_grad()
        store.flush()
        if tier == "disk":  # paged out: placeholders, no memory; the frozen file was written once
            assert all(p.untyped_storage().nbytes() <= 4 for p in optim.frozen(paged))
            assert (tmp_path / "paged-frozen000.safetensors").stat().st_size > blk.fsize * 4
        else:
            lo, hi = blk.host.data_ptr(), blk.host.data_ptr() + blk.host.numel() * 4
            assert all(lo <= p.data_ptr() < hi for p in optim.frozen(paged))
    store.activate(0)
    assert all(torch.equal(p, q) for p, q in zip(optim.frozen(paged), frozen_before))
    assert all(p.dtype == q.dtype for p, q in zip(optim.frozen(paged), frozen_before))
    got, want = store.tensors(0), checkpoint.block_state(ref, ref_opt)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert store.bytes_in == 4 * blk.total * 4 and store.bytes_out == 3 * blk.size * 4  # frozen: in only
