"""Latent and text-embedding caches (dblocks_fast.cache) with tiny random encoders saved to a temp folder."""

import json

import pytest
import torch

from dblocks_fast.cache import cached_latents, cached_text_embeddings, encoder_key
from dblocks_fast.data import load_digits

diffusers = pytest.importorskip("diffusers")  # the test extra installs it
transformers = pytest.importorskip("transformers")


def _tiny_vae(folder, scaling_factor=0.18215):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
        scaling_factor=scaling_factor,
    )
    vae.save_pretrained(folder)
    return vae.eval()


def _counting(monkeypatch, cls, name):
    calls = []
    original = getattr(cls, name)

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counted)
    return calls


def test_latents_are_encoded_once_and_a_changed_vae_config_makes_the_cache_stale(tmp_path, monkeypatch):
    images = load_digits("all").images[:20]  # (20, 1, 8, 8) in [-1, 1]
    vae = _tiny_vae(tmp_path / "vae")
    with torch.no_grad():
        want = vae.encode(images.repeat(1, 3, 1, 1)).latent_dist.mean * 0.18215
    calls = _counting(monkeypatch, diffusers.AutoencoderKL, "encode")
    said = []
    first = cached_latents(images, tmp_path / "vae", tmp_path / "cache", batch_size=8, log=said.append)
    assert len(calls) == 3 and first.shape == (20, 4, 4, 4)  # 3 batches of at most 8
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-6)
    again = cached_latents(images, tmp_path / "vae", tmp_path / "cache", batch_size=8, log=said.append)
    assert len(calls) == 3 and torch.equal(again, first)  # the second run encodes nothing
    assert "read from the cache" in said[-1]

    _tiny_vae(tmp_path / "vae", scaling_factor=0.5)  # the same weights, another config
    changed = cached_latents(images, tmp_path / "vae", tmp_path / "cache", batch_size=8, log=said.append)
    assert len(calls) == 6
    assert any("is stale: another encoder made it (its config or weights changed)" in s for s in said)
    torch.testing.assert_close(changed, first / 0.18215 * 0.5, rtol=1e-5, atol=1e-6)
    other = cached_latents(images[:10], tmp_path / "vae", tmp_path / "cache", log=said.append)
    assert len(calls) == 7 and "is stale: it holds other data" in " ".join(said)
    torch.testing.assert_close(other, changed[:10], rtol=1e-5, atol=1e-6)


def test_a_cache_cut_short_is_encoded_anew(tmp_path, monkeypatch):
    images = load_digits("all").images[:4]
    _tiny_vae(tmp_path / "vae")
    cached_latents(images, tmp_path / "vae", tmp_path / "cache", log=lambda s: None)
    (index,) = (tmp_path / "cache").glob("latents-*/index.json")
    assert json.loads(index.read_text())["rows"] == 4
    index.unlink()  # a run killed before the commit point
    calls = _counting(monkeypatch, diffusers.AutoencoderKL, "encode")
    cached_latents(images, tmp_path / "vae", tmp_path / "cache", log=lambda s: None)
    assert len(calls) == 1 and index.is_file()


def test_text_embeddings_are_encoded_once(tmp_path, monkeypatch):
    words = ["a", "handwritten", "zero", "one", "three", "digit"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    folder = tmp_path / "enc"
    transformers.BertTokenizer(str(vocab)).save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(words) + 5,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    transformers.BertModel(config).save_pretrained(folder)
    captions = ["a handwritten zero", "one", None, "a digit three"]
    calls = _counting(monkeypatch, transformers.BertModel, "forward")
    first = cached_text_embeddings(captions, folder, tmp_path / "cache", max_length=8, log=lambda s: None)
    assert len(calls) == 1 and first["embeddings"].shape == (4, 8, 16)
    assert first["mask"].sum(1).tolist() == [5, 3, 2, 5]  # [CLS] words [SEP]
    again = cached_text_embeddings(captions, folder, tmp_path / "cache", max_length=8, log=lambda s: None)
    assert len(calls) == 1 and torch.equal(again["embeddings"], first["embeddings"])
    with pytest.raises(ValueError, match="holds no config.json"):
        encoder_key(tmp_path / "cache")


def test_train_on_latents_through_the_command_line(tmp_path, monkeypatch, capsys):
    import matplotlib.pyplot as plt

    from dblocks_fast.cli import main

    _tiny_vae(tmp_path / "vae")  # 8x8 digits -> 4 x 4 x 4 latents
    calls = _counting(monkeypatch, diffusers.AutoencoderKL, "encode")
    fast = ["--steps-per-block", "2", "--batch-size", "16", "--warmup", "1", "--no-progress", "--blocks", "2"]
    vae = ["--vae", str(tmp_path / "vae"), "--cache-dir", str(tmp_path / "cache")]
    assert main(["train", *fast, *vae, "--no-eval", "--out", str(tmp_path / "a")]) == 0
    encoded = len(calls)
    assert encoded > 0 and "latents: encoded 1438 rows" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["task"]["config"]["channels"] == 4 and manifest["task"]["config"]["image_size"] == 4
    assert main(["train", *fast, *vae, "--no-eval", "--out", str(tmp_path / "b")]) == 0
    assert len(calls) == encoded and "latents: read from the cache" in capsys.readouterr().out
    grid = tmp_path / "grid.png"
    assert (
        main(
            [
                "sample",
                "--run",
                str(tmp_path / "b"),
                "--per-class",
                "2",
                "--num-steps",
                "2",
                "--out",
                str(grid),
            ]
        )
        == 0
    )
    # decoded to 8x8 pixels: 10 rows of (8 + 2) x 4 pixels; latents would give (4 + 2) x 4
    assert plt.imread(grid).shape[:2] == (10 * 10 * 4, 2 * 10 * 4)
