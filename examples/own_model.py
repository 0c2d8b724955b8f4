"""Train a transformer of your own block-wise, with flow matching, on the built-in digits, then sample it.

    python examples/own_model.py            # 3 blocks of a 6-layer model, 600 steps each
    PYTHONPATH=examples dblocks-fast sample --run runs/own-model --out grid.png   # it reloads later

The network below is written the way you would write any residual transformer: a stem that turns the input
into tokens and a conditioning vector, layers `layer(h, c) -> h`, and a head back to the input's shape.
`build` returns it as a `dblocks_fast.Network`; the package splits its layers into blocks, gives every block
its own copy of stem and head (mode "independent"), and trains each block as the denoiser of its own range of
flow-matching times t. The run folder records "own_model:build" and its settings, so `dblocks_fast.load`
rebuilds the model wherever this module can be imported.

Measured once on 2 CPU cores shared with other jobs (commit 24b5d39): 18 min 29 s of training, then sample
accuracy 1.000 and Frechet distance 12.79 (20 samples per class; real digits score 5.89 at that count).
"""

import sys
from pathlib import Path

import torch
from torch import nn

import dblocks_fast as dbf
from dblocks_fast.quality import evaluate
from dblocks_fast.testing import check_task


class Stem(nn.Module):
    """Image patches -> tokens h; noise level and class label -> conditioning vector c."""

    def __init__(self, hidden: int, patch: int, size: int, channels: int, classes: int):
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(channels * patch * patch, hidden)
        self.pos = nn.Parameter(torch.zeros(1, (size // patch) ** 2, hidden))
        self.time = nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label = nn.Embedding(classes + 1, hidden)  # the last row: "no label" (classifier-free guidance)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, x, c_noise, label):
        n, c, p = x.shape[0], x.shape[1], self.patch
        patches = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(n, -1, c * p * p)
        return self.embed(patches) + self.pos, self.time(c_noise[:, None]) + self.label(label)


class Layer(nn.Module):
    """A pre-norm transformer layer; c scales and shifts the normalised tokens (FiLM)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
        self.film = nn.Linear(hidden, 4 * hidden)
        nn.init.zeros_(self.film.weight), nn.init.zeros_(self.film.bias)

    def forward(self, h, c):
        s1, b1, s2, b2 = self.film(c)[:, None].chunk(4, dim=-1)
        a = self.norm1(h) * (1 + s1) + b1
        h = h + self.attn(a, a, a, need_weights=False)[0]
        return h + self.mlp(self.norm2(h) * (1 + s2) + b2)


class Head(nn.Module):
    """Tokens -> an image of the input's shape."""

    def __init__(self, hidden: int, patch: int, size: int, channels: int):
        super().__init__()
        self.patch, self.size, self.channels = patch, size, channels
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, channels * patch * patch)
        nn.init.zeros_(self.out.weight), nn.init.zeros_(self.out.bias)

    def forward(self, h, c):
        n, p, g, ch = h.shape[0], self.patch, self.size // self.patch, self.channels
        y = self.out(self.norm(h)).view(n, g, g, ch, p, p).permute(0, 3, 1, 4, 2, 5)
        return y.reshape(n, ch, g * p, g * p)


def build(hidden=64, heads=4, num_layers=6, patch=2, size=8, channels=1, classes=10):
    """The model as the package splits it: its layers, and how to build a stem and a head."""
    return dbf.Network(
        layers=nn.ModuleList(Layer(hidden, heads) for _ in range(num_layers)),
        stem=lambda: Stem(hidden, patch, size, channels, classes),
        head=lambda: Head(hidden, patch, size, channels),
        null_label=classes,  # the label that means "none", for classifier-free guidance
        cond_dropout=0.1,  # how often training drops the label
    )


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # so "own_model:build" imports this file
    train, test = dbf.data.load_digits("train"), dbf.data.load_digits("test")
    task = dbf.CustomTask.for_data(train, "own_model:build", {"num_layers": 6})
    check_task(task, train)  # the promises the trainer relies on, checked on a few examples
    config = dbf.TrainConfig(
        num_blocks=3, steps_per_block=600, batch_size=128, lr=1e-3, warmup=50,
        process="flow",  # rectified flow, as SD3 and Flux train; "edm" is the other choice
        out_dir="runs/own-model",
    )  # fmt: skip
    model = dbf.train(task, train, config, resume=Path("runs/own-model/manifest.json").exists())
    sampling = dict(num_steps=12, sampler="heun", cfg_scale=1.5)
    figures = evaluate(model, train, test, per_class=20, **sampling)
    print(
        f"sample accuracy {figures['sample_accuracy']:.3f}, Frechet distance "
        f"{figures['frechet_distance']:.2f} (real digits: {figures['real_frechet']:.2f})"
    )
    again = dbf.load("runs/own-model")  # what a later session does: the run folder rebuilds the model
    images = dbf.sample(again, torch.arange(10), **sampling)
    print(f"sampled {tuple(images.shape)} from the reloaded run")


if __name__ == "__main__":
    main()
