"""The recurrent-depth (Huginn-style) baseline: causality, truncated backprop, weight sharing across
iterations, the iteration sampler, training and its compute count, bits per byte, generation, errors."""

import tokenize as _tokenize

import pytest
import torch
import torch.nn.functional as F

from dblocks_fast import TrainConfig
from dblocks_fast.data import TextData
from dblocks_fast.tasks.recurrent import (
    RecurrentConfig,
    RecurrentDepthLM,
    diffusion_layer_evaluations,
    recurrent_bits_per_byte,
    recurrent_generate,
    recurrent_layer_evaluations,
    sample_iterations,
    train_recurrent_baseline,
)

T = 10


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text():
    with open(_tokenize.__file__, "rb") as f:
        return TextData(torch.frombuffer(bytearray(f.read()), dtype=torch.uint8), T, "tokenize.py")


def _cfg(**kw):
    base = dict(
        seq_len=T, hidden=16, heads=2, prelude=1, core=1, coda=1, mean_iterations=3, backprop_iterations=1
    )
    return RecurrentConfig(**{**base, **kw})


def _shake(module, seed=0, scale=0.3):
    """Move every parameter away from its (AdaLN-Zero) init, so every input and iteration matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p += scale * torch.randn(p.shape, generator=g)
    return module


def _model(**kw):
    torch.manual_seed(0)
    return _shake(RecurrentDepthLM(_cfg(**kw)))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _tokens(n=2, t=T, seed=1):
    return torch.randint(0, 256, (n, t), generator=_gen(seed))


# --- causality --------------------------------------------------------------------------------------------
def test_position_i_sees_bytes_up_to_i_only():
    model = _model()
    tokens = _tokens()
    with torch.no_grad():
        base = model(tokens, 3, generator=_gen())
        assert base.shape == (2, T, 256)
        for j in range(T):
            t = tokens.clone()
            t[:, j] = (t[:, j] + 1 + torch.arange(2) * 7) % 256
            out = model(t, 3, generator=_gen())
            diff = (out - base).abs().amax(dim=(0, 2))  # per position
            assert j == 0 or float(diff[:j].max()) < 1e-6, f"byte {j} leaked into earlier positions"
            assert float(diff[j]) > 1e-4, f"position {j} does not read its own byte"


def test_initial_state_of_a_position_does_not_depend_on_length():
    model = _model()
    tokens = _tokens()
    with torch.no_grad():
        full = model(tokens, 2, generator=_gen(3))
        part = model(tokens[:, :4], 2, generator=_gen(3))
    torch.testing.assert_close(part, full[:, :4], atol=1e-5, rtol=1e-5)


# --- truncated backprop -----------------------------------------------------------------------------------
def _grads(model, loss):
    model.zero_grad(set_to_none=False)
    loss.backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def _loss(logits, tokens):
    return F.cross_entropy(logits[:, :-1].reshape(-1, 256), tokens[:, 1:].reshape(-1))


def test_truncated_backprop_matches_detaching_the_first_iterations():
    model = _model()
    tokens = _tokens()
    got = _grads(model, _loss(model(tokens, 3, generator=_gen(), backprop_iterations=1), tokens))

    def manual(detach: bool):
        e, c, mask = model.encode(tokens)
        s = model.initial_state(2, T, _gen())
        for _ in range(2):
            s = model.iterate(s, e, c, mask)
        s = s.detach() if detach else s
        return _grads(model, _loss(model.decode(model.iterate(s, e, c, mask), c, mask), tokens))

    want, full = manual(True), manual(False)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5, msg=k)
    # the check has teeth: full backprop differs in the core, the adapter and the prelude
    for k in ("core.0.attn.qkv.weight", "adapter.weight", "prelude.0.mlp.fc1.weight"):
        assert float((full[k] - want[k]).abs().max()) > 1e-6, k
    # and None / k >= K is full backprop
    for k_bp in (None, 3, 5):
        g = _grads(model, _loss(model(tokens, 3, generator=_gen(), backprop_iterations=k_bp), tokens))
        for k in full:
            torch.testing.assert_close(g[k], full[k], atol=1e-6, rtol=1e-5, msg=k)


# --- weight sharing ---------------------------------------------------------------------------------------
def test_the_same_core_runs_every_iteration():
    models = [RecurrentDepthLM(_cfg(mean_iterations=m)) for m in (2, 16)]
    assert sum(p.numel() for p in models[0].parameters()) == sum(p.numel() for p in models[1].parameters())
    model = _model()
    tokens = _tokens()
    with torch.no_grad():
        outs = [model(tokens, k, generator=_gen()) for k in (1, 2, 3)]
        # by hand, with the one core module applied three times
        e, c, mask = model.encode(tokens)
        s = model.initial_state(2, T, _gen())
        for _ in range(3):
            s = model.iterate(s, e, c, mask)
        manual = model.decode(s, c, mask)
    assert float((outs[0] - outs[1]).abs().max()) > 1e-4
    assert float((outs[1] - outs[2]).abs().max()) > 1e-4
    torch.testing.assert_close(outs[2], manual)
    assert len(model.core) == 1


def test_the_initial_state_matters_and_is_seeded():
    model = _model()
    tokens = _tokens()
    with torch.no_grad():
        a, b, c = (model(tokens, 2, generator=_gen(s)) for s in (0, 0, 1))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert float((a - c).abs().max()) > 1e-4
    with torch.no_grad():
        zero = RecurrentDepthLM(_cfg(state_std=0.0))
        zero.load_state_dict(model.state_dict())
        torch.testing.assert_close(zero(tokens, 2, generator=_gen(0)), zero(tokens, 2, generator=_gen(1)))


# --- the iteration sampler --------------------------------------------------------------------------------
@pytest.mark.parametrize("mean", [2, 8, 32])
def test_sample_iterations_mean_and_range(mean):
    g = _gen(5)
    ks = torch.tensor([sample_iterations(mean, g) for _ in range(4000)], dtype=torch.float64)
    assert int(ks.min()) >= 1 and int(ks.max()) <= 4 * mean
    assert abs(float(ks.mean()) - mean) < 0.05 * mean
    assert float(ks.std()) > 0.2 * (mean - 1) ** 0.5  # a distribution, not a constant
    g1, g2 = _gen(9), _gen(9)
    assert [sample_iterations(mean, g1) for _ in range(20)] == [
        sample_iterations(mean, g2) for _ in range(20)
    ]
    assert sample_iterations(1, g) == 1


# --- training and its compute -----------------------------------------------------------------------------
def _train_config(**kw):
    base = dict(
        num_blocks=1, steps_per_block=30, batch_size=16, lr=1e-2, warmup=2, progress=False, device="cpu"
    )
    return TrainConfig(**{**base, **kw})


def test_training_lowers_the_loss_and_counts_layer_evaluations(text):
    cfg = _cfg(mean_iterations=3, backprop_iterations=2)
    model = train_recurrent_baseline(cfg, text, _train_config())
    assert not model.training
    before = recurrent_bits_per_byte(RecurrentDepthLM(cfg), text, 3, max_windows=64)
    after = recurrent_bits_per_byte(model, text, 3, max_windows=64)
    assert before == pytest.approx(8.0, abs=1e-5)
    assert after < before - 1.0
    ev = model.layer_evaluations
    ks = ev["iterations"]
    assert len(ks) == 30 and all(1 <= k <= 12 for k in ks)
    assert ev["forward"] == sum(2 + k for k in ks)  # prelude 1 + K x core 1 + coda 1
    assert ev["backprop"] == sum(2 + min(2, k) for k in ks)
    # the K sequence is a function of (seed, step): the same seed draws it again, another seed does not
    again = train_recurrent_baseline(cfg, text, _train_config(steps_per_block=4))
    assert again.layer_evaluations["iterations"] == ks[:4]
    other = train_recurrent_baseline(cfg, text, _train_config(seed=1))
    assert other.layer_evaluations["iterations"] != ks


def test_layer_evaluation_formulas():
    cfg = RecurrentConfig(prelude=2, core=4, coda=2, backprop_iterations=2, seq_len=64)
    ev = recurrent_layer_evaluations(cfg, [1, 3, 8])
    assert ev["forward"] == (4 + 4) + (4 + 12) + (4 + 32)
    assert ev["backprop"] == (4 + 4) + (4 + 8) + (4 + 8)
    assert ev["tokens_per_sequence"] == 64 and ev["steps"] == 3
    db = diffusion_layer_evaluations(cfg.num_layers, 300, 64)
    assert db == {"steps": 300, "forward": 2400, "backprop": 2400, "tokens_per_sequence": 128}


# --- evaluation and generation ----------------------------------------------------------------------------
def test_untrained_model_scores_exactly_8_bits(text):
    model = RecurrentDepthLM(_cfg())
    assert recurrent_bits_per_byte(model, text, 4, max_windows=20) == pytest.approx(8.0, abs=1e-6)


def test_bits_per_byte_matches_a_manual_cross_entropy(text):
    model = _model().eval()
    tokens = text.batch(torch.arange(5))["tokens"]
    from dblocks_fast import rng

    with torch.no_grad():
        logits = model(tokens, 2, generator=rng.generator("cpu", 0, rng.EVAL, 0))
    want = float(_loss(logits, tokens)) / torch.log(torch.tensor(2.0)).item()
    small = TextData(text.data[: 5 * T].clone(), T, "five")
    assert recurrent_bits_per_byte(model, small, 2) == pytest.approx(want, rel=1e-5)


def test_generate_keeps_the_prompt_is_seeded_and_matches_teacher_forcing():
    model = _model()
    prompt = _tokens(2, 3, seed=4)
    a = recurrent_generate(model, prompt, 5, iterations=2, seed=0)
    b = recurrent_generate(model, prompt, 5, iterations=2, seed=0)
    assert a.shape == (2, 8) and a.dtype == torch.int64
    assert torch.equal(a[:, :3], prompt) and torch.equal(a, b)
    from dblocks_fast import rng

    with torch.no_grad():
        logits = model(a, 2, generator=rng.generator("cpu", 0, rng.SAMPLE, 0))
    assert torch.equal(logits[:, 2:-1].argmax(-1), a[:, 3:])  # greedy = argmax of the forward pass
    s1 = recurrent_generate(model, prompt, 5, iterations=2, temperature=1.0, seed=3)
    s2 = recurrent_generate(model, prompt, 5, iterations=2, temperature=1.0, seed=3)
    assert torch.equal(s1, s2) and torch.equal(s1[:, :3], prompt)


# --- errors -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(hidden=15), "must divide hidden"),
        (dict(core=0), "core must be an integer >= 1"),
        (dict(prelude=-1), "prelude must be an integer >= 0"),
        (dict(seq_len=1), "seq_len must be an integer >= 2"),
        (dict(mean_iterations=0), "mean_iterations"),
        (dict(backprop_iterations=0), "backprop_iterations"),
        (dict(state_std=-1.0), "state_std"),
        (dict(mlp_ratio=0.0), "mlp_ratio"),
    ],
)
def test_bad_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**kw).validate()
    with pytest.raises(ValueError, match=match):
        RecurrentDepthLM(_cfg(**kw))


def test_bad_calls(text):
    model = RecurrentDepthLM(_cfg())
    tokens = _tokens()
    with pytest.raises(ValueError, match="iterations must be an integer >= 1"):
        model(tokens, 0)
    with pytest.raises(ValueError, match="backprop_iterations"):
        model(tokens, 2, backprop_iterations=0)
    with pytest.raises(ValueError, match="positions"):
        model(_tokens(t=T + 1), 2)
    with pytest.raises(ValueError, match="mean"):
        sample_iterations(0.5, _gen())
    with pytest.raises(ValueError, match="seq_len"):
        recurrent_bits_per_byte(model, text.with_seq_len(T + 2), 2)
    with pytest.raises(ValueError, match="exceeds the model's seq_len"):
        recurrent_generate(model, _tokens(t=6), 5, iterations=2)
    with pytest.raises(ValueError, match="temperature"):
        recurrent_generate(model, _tokens(t=2), 2, iterations=2, temperature=-1.0)
    with pytest.raises(ValueError, match="iterations"):
        recurrent_generate(model, _tokens(t=2), 2, iterations=0)
