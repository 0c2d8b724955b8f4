"""Networks written the way a user would, outside the package, for tests/test_custom_model.py: a small
residual transformer over image patches, and a block factory, each built from a module-level function so
that run folders can import them again ("tests.own_models:residual")."""

import torch
from torch import nn

import dblocks_fast as dbf


class Stem(nn.Module):
    """Patches of x to tokens h, and the noise level and label to a conditioning vector c."""

    def __init__(self, channels: int, size: int, patch: int, hidden: int, classes: int):
        super().__init__()
        self.patch, self.size, self.channels = patch, size, channels
        self.embed = nn.Linear(channels * patch * patch, hidden)
        self.pos = nn.Parameter(0.02 * torch.randn(1, (size // patch) ** 2, hidden))
        self.time = nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label = nn.Embedding(classes + 1, hidden)  # index `classes`: no label

    def forward(self, x, c_noise, cond):
        n, p = x.shape[0], self.patch
        tokens = (
            x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(n, -1, self.channels * p * p)
        )
        c = self.time(c_noise.view(-1, 1)) + self.label(cond)  # float32: the protocol casts the levels
        return self.embed(tokens) + self.pos, c


class Layer(nn.Module):
    """A pre-norm transformer layer whose norms are modulated by c (FiLM)."""

    def __init__(self, hidden: int, heads: int, index: int):
        super().__init__()
        self.index = index  # which layer of the model this is (tests check the split)
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        self.film = nn.Linear(hidden, 2 * hidden)

    def forward(self, h, c):
        scale, shift = self.film(c)[:, None].chunk(2, dim=-1)
        a = self.norm1(h) * (1 + scale) + shift
        h = h + self.attn(a, a, a, need_weights=False)[0]
        return h + self.mlp(self.norm2(h))


class Head(nn.Module):
    def __init__(self, channels: int, size: int, patch: int, hidden: int):
        super().__init__()
        self.patch, self.size, self.channels = patch, size, channels
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, channels * patch * patch)

    def forward(self, h, c):
        n, p, s, ch = h.shape[0], self.patch, self.size // self.patch, self.channels
        y = self.out(self.norm(h)).view(n, s, s, ch, p, p).permute(0, 3, 1, 4, 2, 5)
        return y.reshape(n, ch, s * p, s * p)


def residual(hidden=16, heads=2, num_layers=4, size=8, channels=1, patch=4, classes=10, guidance=True):
    """The whole network as the package splits it."""
    return dbf.Network(
        layers=nn.ModuleList(Layer(hidden, heads, i) for i in range(num_layers)),
        stem=lambda: Stem(channels, size, patch, hidden, classes),
        head=lambda: Head(channels, size, patch, hidden),
        null_label=classes if guidance else None,
        cond_dropout=0.1 if guidance else 0.0,
    )


class WholeBlock(nn.Module):
    def __init__(self, layers: range, hidden=16, heads=2, size=8, channels=1, patch=4, classes=10):
        super().__init__()
        self.stem = Stem(channels, size, patch, hidden, classes)
        self.layers = nn.ModuleList(Layer(hidden, heads, i) for i in layers)
        self.head = Head(channels, size, patch, hidden)

    def forward(self, x, c_noise, cond):
        h, c = self.stem(x, c_noise, cond)
        for layer in self.layers:
            h = layer(h, c)
        return self.head(h, c)


def blocks(num_layers=4, **kw):
    """A factory of whole blocks."""
    return dbf.Blocks(lambda index, layers: WholeBlock(layers, **kw), num_layers)


def wrong_shape(**kw):
    """A head that returns one channel too many."""
    net = residual(**kw)
    head = net.head
    net.head = lambda: _Widen(head())
    return net


class _Widen(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, h, c):
        y = self.head(h, c)
        return torch.cat([y, y[:, :1]], dim=1)


def raises(**kw):
    raise RuntimeError("the weights file is missing")
