import numpy as np
import pytest
import torch

from dblocks_fast.quality import cached_classifier, evaluate, frechet_distance


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 4))
    b = rng.normal(size=(20000, 4)) * 2.0 + np.array([1.0, 0, 0, 2.0])
    # ||mu||^2 + tr(I + 4I - 2 * 2I) = 5 + 4 * (1 + 4 - 4) = 9
    assert frechet_distance(a, b) == pytest.approx(9.0, rel=0.03)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_the_judge_is_accurate_and_cached(digits, tmp_path):
    from dblocks_fast.data import load_digits

    test = load_digits("test")
    clf = cached_classifier(tmp_path, digits)
    with torch.no_grad():
        acc = (clf(test.images).argmax(1) == test.labels).float().mean().item()
    assert acc > 0.93
    again = cached_classifier(tmp_path, digits)  # loaded from the run folder, not retrained
    for p, q in zip(clf.parameters(), again.parameters()):
        assert torch.equal(p, q)
    (tmp_path / "classifier.safetensors").write_bytes(b"garbage")
    rebuilt = cached_classifier(tmp_path, digits)  # a damaged cache is rebuilt, deterministically
    for p, q in zip(clf.parameters(), rebuilt.parameters()):
        assert torch.equal(p, q)


def test_evaluate_scores_real_images_as_good_and_noise_as_bad(digits, tmp_path, monkeypatch):
    import sys

    from dblocks_fast.data import load_digits

    test = load_digits("test")

    def fake_sample(model, labels, **kw):
        """model "real" hands back real training digits of the requested classes: a perfect generator."""
        if model != "real":
            return torch.rand(len(labels), 1, 8, 8) * 2 - 1
        picks = [(digits.labels == c).nonzero()[i % 30] for i, c in enumerate(labels.tolist())]
        return torch.cat([digits.images[i] for i in picks])

    # the package exports the function `sample`, which hides the module of the same name as an attribute
    monkeypatch.setattr(sys.modules["dblocks_fast.sample"], "sample", fake_sample)
    good = evaluate("real", digits, test, run_dir=tmp_path, per_class=20)
    bad = evaluate("noise", digits, test, run_dir=tmp_path, per_class=20)
    assert good["sample_accuracy"] > 0.95 and bad["sample_accuracy"] < 0.3
    assert good["frechet_distance"] < 3 * good["real_frechet"] < bad["frechet_distance"]
    assert (tmp_path / "eval.json").is_file()
