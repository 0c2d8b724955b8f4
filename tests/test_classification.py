"""ViT classification as DiffusionBlocks: training, independence, the frozen label table, predict, errors."""

import dataclasses

import pytest
import torch

from dblocks_fast.data import ImageData, load_digits
from dblocks_fast.schedule import EDM
from dblocks_fast.tasks.classification import (
    ImageClassification,
    ViTClassifier,
    ViTConfig,
    evaluate_accuracy,
    inference_sigmas,
    label_table,
    predict,
    train_baseline,
)
from dblocks_fast.train import Trainer
from tests.invariants import assert_a_step_touches_only_its_block


def _tiny(data, **kw):
    return ImageClassification.for_data(
        data, **{"hidden": 16, "heads": 2, "num_layers": 3, "patch_size": 4, "emb_dim": 8, **kw}
    )


@pytest.fixture
def tiny_vit(digits):
    return _tiny(digits)


@pytest.fixture(scope="module")
def trained():
    """One short training shared by the tests that need a trained model: (trainer, losses per block)."""
    from dblocks_fast import TrainConfig

    data = load_digits("train")
    cfg = TrainConfig(
        num_blocks=3,
        steps_per_block=200,
        batch_size=64,
        lr=3e-3,
        warmup=5,
        log_every=20,
        ckpt_every=0,
        progress=False,
        device="cpu",
    )
    t = Trainer(_tiny(data), data, cfg)
    losses = {b: [] for b in range(3)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains ~5x faster on one thread when the cores are busy
    try:
        for b in t.order:
            losses[int(b)].append(t.step(int(b)).item())
    finally:
        torch.set_num_threads(threads)
    return t, losses


def test_training_lowers_the_loss_of_every_block(trained):
    _, losses = trained
    for b, ls in losses.items():
        first, last = sum(ls[:10]) / 10, sum(ls[-10:]) / 10
        assert last < 0.8 * first, (b, first, last)


def test_predict_shapes_and_accuracy_above_chance(trained):
    t, _ = trained
    test = load_digits("test")
    labels = predict(t.model, test.images[:7])
    assert labels.shape == (7,) and labels.dtype == torch.int64
    logits = predict(t.model, test.images[:7], return_logits=True)
    assert logits.shape == (7, 10)
    assert torch.equal(logits.argmax(-1), labels)  # seeded: the same start noise every call
    assert predict(t.model, test.images[:7], sigmas="boundary", num_steps=6).shape == (7,)
    assert predict(t.model, test.images[:7], sigmas=[80.0, 1.0, 0.0]).shape == (7,)
    acc = evaluate_accuracy(t.model, test)
    assert acc > 0.3, acc  # chance is 0.1; this run scores about 0.5


def test_a_step_of_block_b_touches_only_block_b(tiny_vit, digits, tiny_config):
    t = Trainer(tiny_vit, digits, tiny_config())
    assert_a_step_touches_only_its_block(t, 3)


def test_blocks_hold_fp32_parameters_only_and_each_owns_its_stem(tiny_vit):
    blk = tiny_vit.build_block(0, 1)
    assert list(blk.buffers()) == []  # paging moves parameters only
    assert all(p.dtype == torch.float32 for p in blk.parameters())
    names = {n.split(".")[0] for n, _ in blk.named_parameters()}
    assert {"patch_embed", "pos_embed", "sigma_embed", "label_in", "layers", "head"} <= names
    table = tiny_vit.label_table()
    assert all(p.data_ptr() != table.data_ptr() for p in blk.parameters())


def test_the_likelihood_skip_gives_the_bayes_posterior_and_the_loss_its_definition(digits):
    """With likelihood_skip a fresh block (zero logits: a uniform prior) denoises to the Bayes posterior mean
    of the label given z alone, computed here in float64 from squared distances; with z_input=False its CLS
    slot is a learned token; the loss is w(sigma) CE(F + log p(z | label)) + prior_loss CE(F)."""
    task = _tiny(digits, likelihood_skip=True, z_input=False, prior_loss=0.5)
    blk = task.build_block(0, 1)
    names = {n.split(".")[0] for n, _ in blk.named_parameters()}
    assert "cls" in names and "label_in" not in names
    table = task.label_table()
    images = digits.batch(torch.arange(5))["y"]
    labels = digits.batch(torch.arange(5))["label"]
    z = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.05, 0.3, 1.0, 5.0, 80.0])
    post = -(z.double()[:, None] - table.double()).square().sum(-1) / (2 * sigma.double()[:, None] ** 2)
    want = post.softmax(-1) @ table.double()
    torch.testing.assert_close(task.denoise(blk, z, sigma, images).double(), want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # a block away from its init: F no longer uniform
        for p in blk.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    _, per_sample = task.loss(blk, {"y": images, "label": labels}, sigma, torch.Generator().manual_seed(3),
                              process=EDM(4))  # fmt: skip
    zz = table[labels].double() + sigma.double()[:, None] * torch.randn(
        5, 8, generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        f = task.network_logits(blk, zz.float(), sigma, images).double()
    loglik = -(zz[:, None] - table.double()).square().sum(-1) / (2 * sigma.double()[:, None] ** 2)
    ce = torch.nn.functional.cross_entropy
    want = task.loss_weight(sigma).double() * ce(f + loglik, labels, reduction="none")
    want = want + 0.5 * ce(f, labels, reduction="none")
    torch.testing.assert_close(per_sample.double(), want, rtol=2e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no block reads z"):
        _tiny(digits, z_input=False)
    with pytest.raises(ValueError, match="set prior_loss=0"):
        _tiny(digits, prior_loss=1.0)


def test_label_table_is_frozen_seeded_and_unit_norm(digits, trained):
    a, b = _tiny(digits), _tiny(digits)
    ea = a.label_table()
    assert ea.shape == (10, 8) and not ea.requires_grad
    assert torch.equal(ea, b.label_table())  # same seed: the same table for every task, block, process
    assert torch.equal(ea, label_table(10, 8, 0))
    assert not torch.equal(ea, _tiny(digits, label_seed=1).label_table())
    torch.testing.assert_close(ea.norm(dim=1), torch.ones(10), atol=1e-6, rtol=0)
    t, _ = trained  # training did not move it
    assert torch.equal(t.task.label_table(), label_table(10, 8, 0))


def test_rows_shards_give_the_full_batch_loss(tiny_vit, digits):
    blk = tiny_vit.build_block(1, 1)
    torch.manual_seed(0)
    for p in blk.parameters():  # away from the zero init, so every input matters
        p.data += 0.1 * torch.randn_like(p)
    batch = digits.batch(torch.arange(12))
    sigma = torch.exp(torch.randn(12, dtype=torch.float64) - 1.2)

    def loss(rows=None, lo=0, hi=12):
        g = torch.Generator().manual_seed(5)
        part = {k: v[lo:hi] for k, v in batch.items()}
        return tiny_vit.loss(blk, part, sigma[lo:hi], g, rows=rows, process=EDM(3))

    full, per_sample = loss()
    a, pa = loss((0, 12), 0, 6)
    b, pb = loss((6, 12), 6, 12)
    # fp32 sums: equal to a relative 1e-6 (the loss here is ~40, where one ulp is 4e-6)
    torch.testing.assert_close((a + b) / 2, full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.cat([pa, pb]), per_sample, atol=1e-6, rtol=1e-6)


def test_loss_weight_is_clamped(digits):
    s = torch.tensor([0.002, 0.01, 1.0], dtype=torch.float64)
    w = _tiny(digits, max_weight=100.0).loss_weight(s)
    assert w[:2].tolist() == [100.0, 100.0] and w[2] == pytest.approx(5.0)
    assert _tiny(digits, max_weight=None).loss_weight(s)[0] == pytest.approx(250004.0)


def test_denoise_is_a_point_of_the_target_space(tiny_vit):
    blk = tiny_vit.build_block(0, 1)
    images = load_digits("test").images[:4]
    d = tiny_vit.denoise(blk, torch.randn(4, 8), torch.full((4,), 2.0), images)
    # a fresh block predicts uniform probabilities, so D is the mean of the table's rows
    torch.testing.assert_close(d, tiny_vit.label_table().mean(0).expand(4, -1), atol=1e-6, rtol=0)


def test_to_dict_round_trips(tiny_vit):
    d = tiny_vit.to_dict()
    assert d["kind"] == ImageClassification.kind
    assert ImageClassification(ViTConfig(**d["config"])).to_dict() == d


def test_baseline_has_the_same_depth_and_trains(tiny_vit, digits, tiny_config):
    model = ViTClassifier(tiny_vit.config)
    assert len(model.layers) == tiny_vit.num_layers
    trained = train_baseline(tiny_vit, digits, tiny_config(steps_per_block=3))
    assert isinstance(trained, ViTClassifier)
    assert 0.0 <= evaluate_accuracy(trained, load_digits("test")) <= 1.0
    with pytest.raises(ValueError, match="larger than the training set"):  # was a ZeroDivisionError
        train_baseline(tiny_vit, digits, tiny_config(batch_size=len(digits) + 1))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(patch_size=3), "must divide image_size"),
        (dict(heads=3), "must divide hidden"),
        (dict(max_weight=0.0), "max_weight"),
        (dict(num_classes=1), "num_classes"),
        (dict(emb_dim=0), "emb_dim"),
        (dict(sigma_data=-1.0), "sigma_data"),
    ],
)
def test_bad_configs_are_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        ImageClassification(ViTConfig(**kw))


def test_bad_data_is_rejected(tiny_vit, digits):
    small = ImageData(torch.zeros(4, 1, 4, 4), torch.zeros(4, dtype=torch.long), 10, "small")
    with pytest.raises(ValueError, match=r"the model expects \(1, 8, 8\)"):
        tiny_vit.check_data(small)
    bad_labels = dataclasses.replace(digits, labels=digits.labels + 5, name="shifted")
    with pytest.raises(ValueError, match="outside"):
        tiny_vit.check_data(bad_labels)
    with pytest.raises(ValueError, match="needs an image dataset"):
        tiny_vit.check_data([1, 2, 3])
    wide = ImageData(torch.zeros(4, 1, 8, 6), torch.zeros(4, dtype=torch.long), 10, "wide")
    with pytest.raises(ValueError, match="only square images"):
        ImageClassification.for_data(wide)
    with pytest.raises(ValueError, match="guidance"):
        tiny_vit.null_cond(digits.images[:2])


def test_predict_rejects_wrong_images_and_sigmas(trained):
    t, _ = trained
    images = load_digits("test").images[:2]
    with pytest.raises(ValueError, match="images must have shape"):
        predict(t.model, torch.zeros(3, 1, 6, 6))
    with pytest.raises(ValueError, match="decrease and end in 0"):
        predict(t.model, images, sigmas=[1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="'middle', 'boundary'"):
        predict(t.model, images, sigmas="top")
    with pytest.raises(ValueError, match="one step per block"):
        predict(t.model, images, num_steps=6)


def test_inference_sigmas_one_per_block(trained):
    t, _ = trained
    sch = t.model.schedule
    mid = inference_sigmas(sch)
    assert mid[0] == sch.sigma_max and mid[-1] == 0 and len(mid) == sch.num_blocks + 1
    assert [sch.block_of(float(s)) for s in mid[:-1]] == list(range(sch.num_blocks))
    torch.testing.assert_close(inference_sigmas(sch, "boundary"), sch.grid(sch.num_blocks))


def test_cli_trains_and_scores_the_digits_vit_preset(tmp_path, capsys):
    import json

    from dblocks_fast.cli import main

    run = tmp_path / "vit"
    argv = [
        "train",
        "--preset",
        "digits-vit",
        "--steps-per-block",
        "4",
        "--batch-size",
        "16",
        "--out",
        str(run),
    ]
    assert main(argv) == 0
    result = json.loads((run / "eval.json").read_text())
    assert 0.0 <= result["test_accuracy"] <= 1.0 and result["num_blocks"] == 3
    assert "test accuracy:" in capsys.readouterr().out
    assert main(["eval", "--run", str(run)]) == 0  # the preset is read back from the run folder
    with pytest.raises(SystemExit, match="is a classifier"):
        main(["sample", "--run", str(run), "--out", str(tmp_path / "grid.png")])


def test_label_scale_sets_the_row_length_and_is_checked():
    task = ImageClassification(ViTConfig(label_scale=0.25))
    norms = task.label_table().norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, 0.25))
    with pytest.raises(ValueError, match="label_scale must be a finite value > 0"):
        ViTConfig(label_scale=0.0).validate()
