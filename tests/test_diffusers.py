"""Pretrained diffusers transformers, block-wise (dblocks_fast/integrations/diffusers.py): each supported
class, built from a tiny random config, saved with save_pretrained and loaded back through from_pretrained, as
a user's checkpoint would be; split into blocks that hold exactly their layers; trained with the package's
guarantees (any order, one block alone, resume on the disk tier, merge of --only-blocks runs); put back into a
diffusers pipeline, which calls each block at its own timesteps."""

import json

import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers extra: pip install -e '.[diffusers]'")

import diffusers  # noqa: E402

import dblocks_fast as dbf  # noqa: E402
from dblocks_fast import checkpoint  # noqa: E402
from dblocks_fast.cli import main as cli  # noqa: E402
from dblocks_fast.integrations import diffusers as dd  # noqa: E402
from tests.invariants import assert_a_step_touches_only_its_block, block_states  # noqa: E402

FACTORY = "dblocks_fast.integrations.diffusers:transformer"
S, TXT, POOLED = 5, 12, 6  # text tokens, their width, the pooled projection's width


def _dit():
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2, num_layers=4,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    )  # fmt: skip


def _pixart():
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3,
        cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=TXT,
    )  # fmt: skip


def _sd3():
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=TXT, caption_projection_dim=16, pooled_projection_dim=POOLED, out_channels=4,
        pos_embed_max_size=16,
    )  # fmt: skip


def _flux():
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=TXT, pooled_projection_dim=POOLED,
        axes_dims_rope=(2, 2, 4),
    )  # fmt: skip


def _inputs(name: str, n: int, g: torch.Generator):
    """(x, the block's condition, the model's own keyword arguments besides hidden_states and timestep)."""
    if name == "dit":
        labels = torch.randint(0, 10, (n,), generator=g)
        return torch.randn(n, 1, 8, 8, generator=g), labels, {"class_labels": labels}
    text = torch.randn(n, S, TXT, generator=g)
    if name == "pixart":
        return (
            torch.randn(n, 4, 8, 8, generator=g),
            {"encoder_hidden_states": text},
            {"encoder_hidden_states": text},
        )
    cond = {"encoder_hidden_states": text, "pooled_projections": torch.randn(n, POOLED, generator=g)}
    if name == "sd3":
        return torch.randn(n, 4, 8, 8, generator=g), cond, cond
    ids = {"img_ids": torch.randn(16, 3, generator=g), "txt_ids": torch.zeros(S, 3)}
    return torch.randn(n, 16, 8, generator=g), {**cond, **ids}, {**cond, **ids}


MODELS = {"dit": (_dit, 1000.0), "pixart": (_pixart, 1000.0), "sd3": (_sd3, 1000.0), "flux": (_flux, 1.0)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each model class, tiny and random, saved as a user's checkpoint would be; (folder, the model)."""
    out = {}
    for name, (make, _) in MODELS.items():
        torch.manual_seed(0)
        model = make().eval()
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (folder, model)
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_one_block_of_all_layers_is_the_pretrained_model_and_a_block_holds_only_its_layers(saved, name):
    folder, model = saved[name]
    spec = dd.transformer(str(folder))
    lists = dd.layer_lists(model)
    total = sum(len(lst) for _, lst in lists)
    assert spec.num_layers == total and spec.processes == ("flow",)
    g = torch.Generator().manual_seed(1)
    x, cond, kwargs = _inputs(name, 3, g)
    t = torch.rand(3, generator=g, dtype=torch.float64).float()
    whole = spec.make_block(0, range(total)).eval()
    shared = spec.make_part(0, range(total)).eval()  # mode "shared": the layers alone, and one frame
    frame = spec.shared().eval()
    assert sum(len(lst) for name, lst in frame.named_children() if name in dd.LAYER_LISTS) == 0
    with torch.no_grad():
        want = model(x, timestep=t * MODELS[name][1], return_dict=False, **kwargs)[0][:, : x.shape[1]]
        assert torch.equal(whole(x, 4 * t, cond), want)  # c_noise = 4 t under flow matching
        assert torch.equal(shared(x, 4 * t, cond, shared=frame), want)
    assert {n.split(".")[0] for n, _ in shared.named_parameters()} == {"layers"}

    layers = [layer for _, lst in lists for layer in lst]
    part = range(1, total - 1)
    block = spec.make_block(1, part).eval()
    mine = [layer for _, lst in dd.layer_lists(block.model) for layer in lst]
    assert len(mine) == len(part)
    for i, layer in zip(part, mine):  # copies of exactly layers 1 .. L-2, in order
        a, b = layers[i].state_dict(), layer.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    calls = []
    for i, layer in zip(part, mine):
        layer.register_forward_pre_hook(lambda *_, i=i: calls.append(i))
    with torch.no_grad():
        out = block(x, 4 * t, cond)
    assert calls == list(part) and out.shape == x.shape
    assert sum(len(lst) for _, lst in lists) == total  # the pretrained model kept all its layers


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_a_block_reads_only_its_own_layers_from_the_files_and_equals_the_loaded_model(
    saved, name, dtype, tmp_path, monkeypatch
):
    """Host memory holds one block's share while it is built: its tensors are read from the safetensors files
    (sharded ones too), never the whole model; the result is what from_pretrained gives, bit for bit, dtypes
    and computed buffers included."""
    import safetensors

    folder, model = saved[name]
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")  # an index and several files, as large models are
    assert len(list(sharded.glob("*.safetensors"))) > 1
    total = sum(len(lst) for _, lst in dd.layer_lists(model))
    loaded = type(model).from_pretrained(folder, torch_dtype=getattr(torch, dtype)).eval()
    read, real = [], safetensors.safe_open

    class Counting:
        def __init__(self, *a, **kw):
            self.f = real(*a, **kw)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.f.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Counting)
    spec = dd.transformer(str(sharded), dtype=dtype, lora={"rank": 2} if dtype != "float32" else None)
    dd._pretrained.cache_clear()
    part = range(1, total - 1)
    for got, want in (
        (spec.make_block(1, part).model, dd.split(loaded, part)),
        (spec.make_part(1, part).layers, dd.cut(loaded, part)),
        (spec.shared(), dd.frame(loaded)),
    ):
        a = {k.replace(".base_layer", ""): v for k, v in got.state_dict().items() if "lora_" not in k}
        b = want.state_dict()
        assert a.keys() == b.keys()
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in b)
    assert dd._pretrained.cache_info().currsize == 0  # the whole model was never loaded
    prefixes = [f"{n}.{i}." for n, lst in dd.layer_lists(model) for i in range(len(lst))]
    mine = tuple(prefixes[i] for i in part)
    others = tuple(p for i, p in enumerate(prefixes) if i not in part)
    assert any(k.startswith(mine) for k in read) and not any(k.startswith(others) for k in read)


def test_a_checkpoint_that_lacks_a_tensor_of_its_class_names_it(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, model = saved["dit"]
    broken = tmp_path / "broken"
    model.save_pretrained(broken)
    weights = broken / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    del tensors["transformer_blocks.1.attn1.to_q.weight"]
    save_file(tensors, weights)
    with pytest.raises(KeyError, match=r"holds no tensor 'transformer_blocks.1.attn1.to_q.weight', which "):
        dd.transformer(str(broken)).make_block(1, range(1, 2))


class _TextBatches:
    """Random inputs of a text-conditioned model, as a dataset would give them: the target y, and the
    forward's keyword arguments under their own names (Flux: its positions too)."""

    name = "text-inputs"

    def __init__(self, shape, n=16, ids=False):
        g = torch.Generator().manual_seed(0)
        self.items = {
            "y": torch.randn(n, *shape, generator=g),
            "encoder_hidden_states": torch.randn(n, S, TXT, generator=g),
            "pooled_projections": torch.randn(n, POOLED, generator=g),
        }
        if ids:
            self.items |= {
                "img_ids": torch.randn(n, shape[0], 3, generator=g),
                "txt_ids": torch.zeros(n, S, 3),
            }

    def __len__(self):
        return len(self.items["y"])

    def batch(self, idx):
        return {k: v[idx] for k, v in self.items.items()}


def _dit_task(saved, digits, lora=None, mode="independent"):
    settings = {"path": str(saved["dit"][0])} | ({"lora": lora} if lora else {})
    return dbf.CustomTask.for_data(digits, FACTORY, settings, mode=mode)


def _config(**kw):
    base = dict(
        num_blocks=2, steps_per_block=4, batch_size=8, warmup=1, log_every=2, ckpt_every=0, progress=False,
        device="cpu", out_dir=None,
    )  # fmt: skip
    return dbf.TrainConfig(**{**base, **kw})


def _fit(task, data, cfg, **kw):
    t = dbf.Trainer(task, data, cfg, **kw)
    t.fit()
    return t


def _same(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "differs"


@pytest.mark.parametrize(
    "lora, tier, mode",
    [
        (None, "disk", "independent"),
        ({"rank": 2}, "disk", "independent"),
        ({"rank": 2}, "host", "independent"),
        (None, "host", "shared"),
        ({"rank": 2}, "disk", "shared"),
    ],
)
def test_a_pretrained_dit_trains_in_any_order_alone_resumed_paged_and_merged(
    saved, digits, tmp_path, lora, tier, mode
):
    task = _dit_task(saved, digits, lora, mode)
    assert (task.null_label, task.cond_dropout) == (10, 0.1)  # DiT's own null class and label dropout
    seq = _fit(task, digits, _config(schedule="sequential"))
    assert seq.model.schedule.kind == "flow"  # "auto": the model trains with flow matching
    _same(block_states(seq), block_states(_fit(task, digits, _config(schedule="random"))))
    assert_a_step_touches_only_its_block(dbf.Trainer(task, digits, _config()), 2)

    class Stop(Exception):
        pass

    def stop(trainer, b):
        if sum(trainer.steps_done) == 7:  # saved at 6: block 1 at its step 2
            raise Stop

    run = tmp_path / tier
    cfg = _config(schedule="sequential", offload=tier, out_dir=str(run), ckpt_every=2)
    with pytest.raises(Stop):
        _fit(task, digits, cfg, callback=stop)
    resumed = dbf.Trainer(task, digits, cfg, resume=True)
    assert resumed.steps_done == [4, 2]
    resumed.fit()
    want = {f"{b}/{k}": v.clone() for b in range(2) for k, v in seq.block_tensors(b).items()}
    _same({f"{b}/{k}": v.clone() for b in range(2) for k, v in resumed.block_tensors(b).items()}, want)

    for b in range(2):  # one block a run (one a night, or one a machine), then merged
        _fit(task, digits, _config(only_blocks=[b], out_dir=str(tmp_path / f"only{b}")))
    checkpoint.merge_runs([tmp_path / "only0", tmp_path / "only1"], tmp_path / "merged")
    merged = dbf.load(tmp_path / "merged", device="cpu")
    for b in range(2):
        a, c = seq.model.blocks[b].state_dict(), merged.blocks[b].state_dict()
        assert all(torch.equal(a[k], c[k]) for k in a)
    if lora:  # only the adapters trained, and only they (and their moments) are in the run folder
        pretrained = dict(saved["dit"][1].named_parameters())
        for name, p in seq.model.blocks[0].named_parameters():
            assert p.requires_grad == (".lora_" in name)
            base = name.removeprefix("model.").replace(".base_layer", "")
            if not p.requires_grad and base in pretrained:
                assert torch.equal(p, pretrained[base]), name
        stored = checkpoint.read_block(run, checkpoint.read_manifest(run), 0)
        assert stored and all(".lora_" in k for k in stored)


def test_the_cli_trains_a_diffusers_model_and_samples_it(saved, tmp_path, capsys):
    run = tmp_path / "run"
    model = ["--model", FACTORY, "--model-config", json.dumps({"path": str(saved["dit"][0])})]
    fast = ["--blocks", "2", "--steps-per-block", "2", "--batch-size", "8", "--warmup", "1", "--no-progress"]
    assert cli(["train", *model, *fast, "--no-eval", "--out", str(run)]) == 0
    manifest = checkpoint.read_manifest(run)
    assert manifest["complete"] and manifest["schedule"]["kind"] == "flow"
    out = tmp_path / "g.png"
    sample = ["--per-class", "1", "--num-steps", "2", "--out", str(out)]
    assert cli(["sample", "--run", str(run), *sample]) == 0
    assert out.is_file()
    # LoRA, one block a run (one a night, one a machine), merged, sampled
    lora = {"path": str(saved["dit"][0]), "lora": {"rank": 2}}
    model_lora = ["--model", FACTORY, "--model-config", json.dumps(lora)]
    for b in range(2):
        only = ["--only-blocks", str(b), "--out", str(tmp_path / f"only{b}")]
        assert cli(["train", *model_lora, *fast, "--no-eval", *only]) == 0
    merged = tmp_path / "merged"
    assert cli(["merge", str(tmp_path / "only0"), str(tmp_path / "only1"), "--out", str(merged)]) == 0
    assert checkpoint.read_manifest(merged)["complete"]
    assert cli(["sample", "--run", str(merged), *sample]) == 0
    assert len(dd.export_lora(merged, tmp_path / "adapters")) == 2
    assert cli(["train", *model, *fast, "--noise", "edm", "--out", str(tmp_path / "edm")]) == 2
    assert "trains with the flow noise process, not 'edm'" in capsys.readouterr().err
    assert not (tmp_path / "edm").exists()


@pytest.mark.parametrize("mode", ["independent", "shared"])
def test_a_trained_run_samples_inside_a_diffusers_pipeline_each_step_by_the_block_owning_its_timestep(
    saved, mode, tmp_path
):
    data = _TextBatches((4, 8, 8))
    cond = ["encoder_hidden_states", "pooled_projections"]
    task = dbf.CustomTask.for_data(data, FACTORY, {"path": str(saved["sd3"][0])}, cond=cond, mode=mode)
    run = tmp_path / "run"
    dbf.train(task, data, _config(steps_per_block=2, out_dir=str(run)))
    model = dbf.load(run, device="cpu").eval()  # the run folder, as a user samples it later
    process = model.schedule
    calls = []
    for b, block in enumerate(model.blocks):
        first = next(
            iter(block.layers["transformer_blocks"] if mode == "shared" else block.model.transformer_blocks)
        )
        first.register_forward_pre_hook(  # the pipeline runs the block's own first layer
            lambda m, args, kw, b=b: calls.append((b, kw["temb"])), with_kwargs=True
        )
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=dd.PipelineTransformer(model), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    text, pooled = torch.randn(2, S, TXT, generator=g), torch.randn(2, POOLED, generator=g)
    steps = 6
    out = pipe(
        prompt_embeds=text, pooled_prompt_embeds=pooled, num_inference_steps=steps, guidance_scale=1.0,
        output_type="latent", generator=g,
    ).images  # fmt: skip
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    assert len(calls) == steps
    timesteps = pipe.scheduler.timesteps
    owners = [process.block_of(float(t) / 1000) for t in timesteps]
    assert [b for b, _ in calls] == owners and set(owners) == {0, 1}  # both blocks, each at its own steps
    with pytest.raises(ValueError, match="timesteps of one block at a time"):
        dd.PipelineTransformer(model)(torch.zeros(2, 4, 8, 8), timestep=torch.tensor([999.0, 1.0]))


def test_what_cannot_be_split_is_refused_with_the_class_and_what_was_expected(saved, digits, tmp_path):
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,), layers_per_block=1,
        down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=4,
    )  # fmt: skip
    unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(
        ValueError, match="UNet2DModel has no layers to split into blocks: expected an nn.ModuleList"
    ):
        dd.transformer(str(tmp_path / "unet"))
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        dd.transformer(str(tmp_path))
    task = _dit_task(saved, digits)
    with pytest.raises(ValueError, match="DiTTransformer2DModel at .* has 4 layers, fewer than the 5 blocks"):
        dbf.Trainer(task, digits, _config(num_blocks=5))
    with pytest.raises(ValueError, match="dtype must name a torch dtype"):
        dd.transformer(str(saved["dit"][0]), dtype="float33")
    bad = _dit_task(saved, digits, {"rank": 2, "targets": ["no_such_linear"]})
    with pytest.raises(ValueError, match=r"LoRA targets \['no_such_linear'\] match no module of DiTTrans"):
        dbf.Trainer(bad, digits, _config())
    with pytest.raises(ValueError, match="dtype='bfloat16' is for the frozen base of a LoRA run"):
        dd.transformer(str(saved["dit"][0]), dtype="bfloat16")
    with pytest.raises(ValueError, match="lora takes rank, alpha and targets"):
        dd.transformer(str(saved["dit"][0]), lora={"r": 2})


def test_a_bfloat16_base_with_float32_adapters_trains_the_same_bits_resident_and_on_disk(saved, digits):
    task = _dit_task(saved, digits, {"rank": 2})
    task = dbf.CustomTask.for_data(digits, FACTORY, {**task.settings, "dtype": "bfloat16"})
    runs = [_fit(task, digits, _config(offload=tier, schedule="sequential")) for tier in ("none", "disk")]
    dtypes = {n: p.dtype for n, p in runs[0].model.blocks[0].named_parameters()}
    assert {d for n, d in dtypes.items() if ".lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if ".lora_" not in n} == {torch.bfloat16}
    for b in range(2):
        _same(runs[0].block_tensors(b), runs[1].block_tensors(b))


@pytest.mark.parametrize("mode", ["independent", "shared"])
def test_lora_adapters_export_in_peft_format_and_load_into_the_pretrained_model(
    saved, digits, tmp_path, mode
):
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    task = _dit_task(saved, digits, {"rank": 2, "targets": ["to_q", "to_v"]}, mode)
    run = tmp_path / "run"
    model = dbf.train(task, digits, _config(out_dir=str(run)))
    folders = dd.export_lora(run, tmp_path / "lora")
    g = torch.Generator().manual_seed(2)
    x, labels, t = torch.randn(4, 1, 8, 8, generator=g), torch.arange(4), torch.rand(4, generator=g)
    for b, layers in enumerate([range(0, 2), range(2, 4)]):
        state = load_file(folders[b] / "adapter_model.safetensors")
        assert any(k.startswith(f"transformer_blocks.{layers[0]}.") for k in state)  # the whole model's names
        fresh = type(saved["dit"][1]).from_pretrained(saved["dit"][0]).eval()
        inject_adapter_in_model(LoraConfig.from_pretrained(str(folders[b])), fresh)
        assert not set_peft_model_state_dict(fresh, state).unexpected_keys
        block = dd.DiffusersBlock(dd.split(fresh, layers), 1000.0).eval()
        with torch.no_grad():
            assert torch.equal(
                block(x, 4 * t, labels), task._forward(model.blocks[b].eval(), x, 4 * t, labels)
            )
    assert (folders[1] / "adapter_config.json").read_bytes() == (
        folders[0] / "adapter_config.json"
    ).read_bytes()
    full = tmp_path / "full"
    dbf.train(_dit_task(saved, digits), digits, _config(out_dir=str(full), steps_per_block=1))
    with pytest.raises(ValueError, match="was not trained with LoRA"):
        dd.export_lora(full, tmp_path / "none")


def test_a_flux_architecture_from_its_config_alone_trains_lora_on_a_bf16_base_resident_and_paged(
    saved, tmp_path
):
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_bytes((saved["flux"][0] / "config.json").read_bytes())  # no weights
    data = _TextBatches((16, 8), ids=True)
    settings = {"path": str(folder), "weights": "random", "dtype": "bfloat16", "lora": {"rank": 2}}
    cond = ["encoder_hidden_states", "pooled_projections", "img_ids", "txt_ids"]
    task = dbf.CustomTask.for_data(data, FACTORY, settings, cond=cond, mode="shared")
    assert task.num_layers == 5  # 2 double- + 3 single-stream layers; layers=[3, 2]: block 0 holds both kinds
    runs = [_fit(task, data, _config(layers=[3, 2], offload=tier)) for tier in ("none", "host", "disk")]
    for b in range(2):
        _same(runs[0].block_tensors(b), runs[1].block_tensors(b))
        _same(runs[0].block_tensors(b), runs[2].block_tensors(b))
    assert all(torch.isfinite(v).all() for v in runs[0].block_tensors(1).values())
    with pytest.raises(ValueError, match="weights must be 'pretrained' or 'random'"):
        dd.transformer(str(folder), weights="zeros")
