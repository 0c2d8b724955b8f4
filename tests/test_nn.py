import math

import pytest
import torch

from dblocks_fast.nn import AdaLNFinalLayer, AdaLNZeroLayer, SelfAttention, set_kernels, sinusoidal_embedding


def test_fresh_adaln_zero_layer_is_the_identity():
    torch.manual_seed(0)
    layer = AdaLNZeroLayer(24, 3)
    x, c = torch.randn(2, 5, 24), torch.randn(2, 24)
    assert torch.equal(layer(x, c), x)
    out = AdaLNFinalLayer(24, 7)(x, c)
    assert out.shape == (2, 5, 7) and torch.equal(out, torch.zeros_like(out))


def test_adaln_zero_layer_learns_away_from_identity():
    torch.manual_seed(0)
    layer = AdaLNZeroLayer(16, 2)
    x, c = torch.randn(2, 3, 16), torch.randn(2, 16)
    layer(x, c).square().sum().backward()
    assert layer.modulation.weight.grad.abs().sum() > 0  # the gates get a gradient though they start at zero


def test_self_attention_matches_float64_softmax_attention():
    torch.manual_seed(1)
    attn = SelfAttention(12, 3).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    q, k, v = attn.qkv(x).view(2, 7, 3, 3, 4).permute(2, 0, 3, 1, 4)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), -1)
    want = attn.proj((p @ v).transpose(1, 2).reshape(2, 7, 12))
    torch.testing.assert_close(attn(x), want)
    mask = torch.tril(torch.ones(7, 7, dtype=torch.bool))
    p = torch.softmax((q @ k.transpose(-1, -2) / 2).masked_fill(~mask, -math.inf), -1)
    torch.testing.assert_close(attn(x, mask), attn.proj((p @ v).transpose(1, 2).reshape(2, 7, 12)))


def test_sinusoidal_embedding():
    t = torch.tensor([0.0, 1.5])
    e = sinusoidal_embedding(t, 7)
    assert e.shape == (2, 7) and torch.equal(e[:, -1], torch.zeros(2))
    torch.testing.assert_close(e[0, :3], torch.ones(3))  # cos(0)
    torch.testing.assert_close(e[1, 3], torch.sin(torch.tensor(1.5)))


def test_set_kernels():
    layer = AdaLNZeroLayer(8, 2)
    set_kernels(layer, "torch")
    assert layer.kernels == "torch"
    with pytest.raises(ValueError, match="kernels must be one of"):
        set_kernels(layer, "cudnn")
    with pytest.raises(ValueError, match="not divisible"):
        SelfAttention(10, 3)


def test_rotary_positions_make_attention_scores_depend_on_relative_position_only():
    from dblocks_fast.nn.attention import SelfAttention, rotary

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 9, generator=g, dtype=torch.float64), torch.randn(1, 1, 1, 9, generator=g)
    k = k.double()
    # the same q and k placed at positions (i, j): the score depends on i - j alone
    t = 13
    qs, ks = rotary(q.expand(1, 1, t, 9).contiguous()), rotary(k.expand(1, 1, t, 9).contiguous())
    scores = (qs @ ks.transpose(-1, -2))[0, 0]
    for d in (-4, 0, 3):
        diag = torch.diagonal(scores, offset=d)
        assert torch.allclose(diag, diag[:1].expand_as(diag), atol=1e-10), d
    assert not torch.allclose(scores[5, 5], scores[5, 2])
    assert torch.equal(rotary(q)[..., 8], q[..., 8])  # position 0 is not rotated; the odd channel never
    # the layer flag: same weights, rope changes the output
    attn = SelfAttention(8, 2)
    x = torch.randn(2, 5, 8, generator=g)
    plain = attn(x)
    attn.rope = True
    assert not torch.allclose(attn(x), plain)
