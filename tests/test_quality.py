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


_JUDGE = """
import functools, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from dblocks_fast import quality
from dblocks_fast.data import load_digits
quality.train_classifier = functools.partial(quality.train_classifier, steps=20)  # the bits differ early
quality.cached_classifier(sys.argv[2], load_digits("train"))
print(torch.get_num_threads())
"""


def test_the_judge_and_its_cached_file_are_the_same_bits_whatever_the_thread_count(tmp_path):
    """A torchrun rank has 1 thread, a plain process one per core: both must score with the same judge."""
    import subprocess
    import sys

    procs = {}
    for threads in (1, 2):
        (tmp_path / str(threads)).mkdir()
        cmd = [sys.executable, "-c", _JUDGE, str(threads), str(tmp_path / str(threads))]
        procs[threads] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for threads, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert out.split() == [str(threads)]  # the caller's thread count is restored
    one, two = ((tmp_path / str(t) / "classifier.safetensors").read_bytes() for t in (1, 2))
    assert one == two
