"""How good a model's outputs are, judged from outside the model.

Class-conditional images, judged by a small classifier trained on the real training images. Two figures, in
the spirit of Inception Score / FID at the scale of 8x8 digits:
- sample accuracy: how often the classifier assigns a generated image to the label it was generated for;
- Frechet distance between the classifier's penultimate features of generated images and of held-out real
  images (Heusel et al. 2017). `real_frechet` is the same distance for as many real *training* images: the
  floor a perfect generator would reach at this sample size.
The classifier is trained on the CPU from a fixed seed and on one thread, so every run scores with the same
judge, bit for bit, whatever the process's thread count (a torchrun rank has one thread, a plain process
one per core).

Continuations of Python source bytes (the autoregressive LM and its baseline), judged by the end-to-end
model, by a smoothed byte n-gram model of the training text that neither model shaped (`NgramJudge`), and by
Python's tokenizer (`generative_score`, `tokenizes`, `tokenize_fraction`). A model's own
likelihood figures (bits per byte, the MDM's ELBO) stay with its task: they run its inference.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tokenize
import zlib

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from . import rng
from .checkpoint import RunFolder, atomic_save
from .data import ImageData
from .tasks.autoregressive import VOCAB, ARBaselineLM, baseline_generate, generate
from .tasks.text import eval_windows, require_text

__all__ = [
    "FeatureClassifier",
    "train_classifier",
    "cached_classifier",
    "frechet_distance",
    "evaluate",
    "tokenizes",
    "tokenize_fraction",
    "generative_score",
    "NgramJudge",
]


class FeatureClassifier(nn.Module):
    """flatten -> 256 -> `feature_dim` (the features) -> classes; a plain MLP is enough for 8x8 digits."""

    def __init__(self, image_shape: tuple[int, ...], num_classes: int, feature_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(int(np.prod(image_shape)), 256),
            nn.GELU(),
            nn.Dropout(0.2),
            nn.Linear(256, feature_dim),
            nn.GELU(),
        )
        self.out = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


@contextlib.contextmanager
def _one_thread():
    """The judge's arithmetic on one CPU thread, the caller's thread count restored after.

    A matrix product split over threads adds its terms in another order, so a judge trained with 2 threads
    differed in the last bits from one trained with 1 (a torchrun rank), and so did the Frechet distances of
    identical samples. One thread is the count every process can have; the judge is a small MLP, so it
    costs little.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_classifier(
    data: ImageData, steps: int = 1500, batch_size: int = 128, seed: int = 0
) -> FeatureClassifier:
    """Train the judge on the CPU (fixed seed; light noise augmentation so it is not fooled by tiny noise),
    on one thread: the same bits in every process."""
    with torch.random.fork_rng(devices=[]), _one_thread():
        torch.manual_seed(rng.derive_seed(seed, rng.EVAL))
        clf = FeatureClassifier(data.image_shape, data.num_classes)
        opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        clf.train()
        for _ in range(steps):
            idx = torch.randint(len(data), (min(batch_size, len(data)),))
            batch = data.batch(idx)
            x = batch["y"] + 0.05 * torch.randn_like(batch["y"])
            loss = nn.functional.cross_entropy(clf(x), batch["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return clf.eval()


def _fingerprint(data: ImageData) -> str:
    crc = zlib.crc32(data.images.numpy().tobytes())
    crc = zlib.crc32(data.labels.numpy().tobytes(), crc)
    return f"{len(data)}-{data.num_classes}-{crc:08x}"


def cached_classifier(run_dir: str | os.PathLike | None, data: ImageData) -> FeatureClassifier:
    """The judge for `data`: loaded from run_dir/classifier.safetensors if it was trained on the same data."""
    path = RunFolder(run_dir) / RunFolder.CLASSIFIER if run_dir is not None else None
    fp = _fingerprint(data)
    if path is not None and path.is_file():
        clf = FeatureClassifier(data.image_shape, data.num_classes)
        try:
            tensors = load_file(path)
            if json.loads(tensors.pop("__meta__").numpy().tobytes().decode()).get("data") == fp:
                clf.load_state_dict(tensors)
                return clf.eval()
        except Exception:  # a stale or damaged cache is simply rebuilt
            pass
    clf = train_classifier(data)
    if path is not None:
        meta = torch.frombuffer(bytearray(json.dumps({"data": fp}).encode()), dtype=torch.uint8)
        atomic_save(path, {**clf.state_dict(), "__meta__": meta}, scratch=True)  # a cache: no fsync
    return clf


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)) between two sets of feature rows (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    covmean = covmean.real  # imaginary parts are rounding noise for PSD products
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


@torch.no_grad()
def _score(clf: FeatureClassifier, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    x = images.detach().float().cpu().clamp(-1, 1)
    with _one_thread():  # the same features, so the same Frechet distance, in every process
        feats = clf.features(x)
        return feats.numpy(), clf.out(feats).argmax(1).numpy()


def evaluate(
    model,
    train_data: ImageData,
    test_data: ImageData,
    *,
    run_dir=None,
    per_class: int = 50,
    num_steps: int | None = None,
    sampler: str = "heun",
    cfg_scale: float = 1.0,
    seed: int = 0,
    classifier: FeatureClassifier | None = None,
) -> dict:
    """Generate `per_class` samples of every class and score them; also writes run_dir/eval.json if given.

    classifier: the judge to use; None = the one cached in run_dir (trained on train_data if absent).
    """
    # looked up at call time, so a test can stand a fake generator in for dblocks_fast.sample.sample
    from .sample import sample

    clf = classifier if classifier is not None else cached_classifier(run_dir, train_data)
    test_feats, test_pred = _score(clf, test_data.images)
    labels = torch.arange(train_data.num_classes).repeat_interleave(per_class)
    images = sample(model, labels, num_steps=num_steps, sampler=sampler, cfg_scale=cfg_scale, seed=seed)
    gen_feats, gen_pred = _score(clf, images)
    g = np.random.default_rng(rng.derive_seed(seed, rng.EVAL))
    ref_idx = g.choice(len(train_data), size=min(len(labels), len(train_data)), replace=False)
    ref_feats, _ = _score(clf, train_data.images[torch.as_tensor(ref_idx)])
    result = {
        "sample_accuracy": float((gen_pred == labels.numpy()).mean()),
        "frechet_distance": frechet_distance(gen_feats, test_feats),
        "real_frechet": frechet_distance(ref_feats, test_feats),
        "classifier_test_accuracy": float((test_pred == test_data.labels.numpy()).mean()),
        "num_samples": int(len(labels)),
        "num_test": len(test_data),
        "num_steps": num_steps,
        "sampler": sampler,
        "cfg_scale": cfg_scale,
        "seed": seed,
        "samples": images.detach().float().cpu(),
    }
    if run_dir is not None:
        on_disk = {k: v for k, v in result.items() if k != "samples"}
        RunFolder(run_dir).write_json(RunFolder.EVAL, on_disk)
    return result


# --- text: continuations of Python source ------------------------------------------------------------------
def _indent_column(line: str) -> int:
    """The column tokenize gives a line's indentation (tabs to multiples of 8, form feed resets)."""
    col = 0
    for ch in line:
        if ch == " ":
            col += 1
        elif ch == "\t":
            col = (col // 8 + 1) * 8
        elif ch == "\f":
            col = 0
        else:
            break
    return col


def _quote_error(tok: tokenize.TokenInfo) -> bool:
    return tok.type == tokenize.ERRORTOKEN and tok.string in ("'", '"')


def tokenizes(fragment: bytes | str) -> bool:
    """Whether Python's `tokenize` reads a fragment cut out of a source file without error.

    The bytes are decoded as utf-8 with errors="replace" (an invalid byte becomes U+FFFD, which no Python
    token accepts). A window is cut at both ends, so these artefacts of the cut are forgiven:
      - indentation: the lines that opened the enclosing blocks are not in the window, so the fragment is
        read inside blocks opened at every column up to its deepest indentation, and its first (partial)
        line is put deeper than all of them; a dedent is an error only if it is inconsistent within the
        fragment;
      - the end: tokenize.TokenError "EOF in multi-line string" / "EOF in multi-line statement" (an open
        triple-quoted string, bracket or backslash continuation running to the end), and an unterminated
        single-quoted string on the last line when that line has no newline (the cut fell inside it);
      - the start: a lone quote on the first line with no quote before it (the window began inside a
        string).
    Failure: any other tokenize.TokenError, IndentationError or SyntaxError, and any ERRORTOKEN other than
    the forgiven quotes and the whitespace tokenize emits in front of an error (a character no token takes,
    such as $, ?, a lone !, a stray backslash, NUL or U+FFFD, or a lone quote elsewhere). A window that
    closes a bracket it never opened is read, as tokenize reads it, as one statement continued to the end.
    The rules are those of the pure-Python tokenizer (Python <= 3.11); Python 3.12's C tokenizer raises
    TokenError instead of emitting ERRORTOKEN, which the rules map where they can (an unterminated
    string on the last line), so compare scores on one Python version.
    """
    text = fragment.decode("utf-8", errors="replace") if isinstance(fragment, bytes | bytearray) else fragment
    lines = text.split("\n")
    deepest = max((_indent_column(line) for line in lines[1:]), default=0)
    header = "".join(" " * col + "if 1:\n" for col in range(deepest + 1))
    first_line, last_line = deepest + 2, deepest + 1 + len(lines)  # 1-based, as tokenize counts
    body = "\n".join([" " * (deepest + 1) + lines[0].lstrip(" \t\f"), *lines[1:]])
    source = header + body + ("" if body.endswith("\n") else "\n")
    partial_end = not text.endswith("\n")
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type != tokenize.ERRORTOKEN or not tok.string.strip():
                continue
            row, col = tok.start
            if _quote_error(tok) and row == last_line and partial_end:
                return True  # the rest of the fragment is inside the string the cut left open
            if _quote_error(tok) and row == first_line and not any(q in tok.line[:col] for q in "'\""):
                continue
            return False
    except tokenize.TokenError as e:
        msg, (row, _) = e.args[0], e.args[1]
        if "EOF in multi-line" in msg:
            return True
        return "unterminated string literal" in msg and row == last_line and partial_end
    except SyntaxError:  # IndentationError included
        return False
    return True


def tokenize_fraction(prompts: torch.Tensor, continuations: torch.Tensor) -> float:
    """The fraction of rows whose prompt + continuation bytes `tokenizes` accepts."""
    if len(prompts) != len(continuations) or len(prompts) == 0:
        raise ValueError(
            f"need as many prompts as continuations (>= 1), got {len(prompts)}, {len(continuations)}"
        )
    ok = [
        tokenizes(bytes(p.tolist() + c.tolist()))
        for p, c in zip(torch.as_tensor(prompts).cpu(), continuations.cpu())
    ]
    return sum(ok) / len(ok)


class NgramJudge:
    """A byte n-gram model of a text with Witten-Bell interpolation (Chen & Goodman 1998, section 2.4):

        p_k(c | h) = (C(h c) + N(h) p_{k-1}(c | h')) / (C(h) + N(h)),   p_0(c) = 1/256,

    h the k - 1 bytes before c, h' its last k - 2, C counts in the text, N(h) how many distinct bytes follow
    h (p_k = p_{k-1} for an unseen h). Fitted on the training text, it scores generated continuations in
    bits per byte without favouring either model's own distribution: continuations that match the data's
    n-gram statistics score near the validation text's own continuations; repetitive ones score lower,
    garbled ones higher. order: n (at most 3: the counts take 256^n entries)."""

    def __init__(self, text: torch.Tensor, order: int = 3):
        if order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {order}")
        data = torch.as_tensor(text).reshape(-1).to(torch.int64).numpy()
        if data.size < order:
            raise ValueError(f"need at least {order} bytes of text for a {order}-gram model, got {data.size}")
        self.order = order
        self.counts, self.totals, self.distinct = [], [], []
        for k in range(1, order + 1):
            idx = np.zeros(data.size - k + 1, dtype=np.int64)
            for j in range(k):
                idx = idx * 256 + data[j : data.size - k + 1 + j]
            c = np.bincount(idx, minlength=256**k).reshape(-1, 256)
            self.counts.append(c)
            self.totals.append(c.sum(1))
            self.distinct.append((c > 0).sum(1))

    def bits(self, context: torch.Tensor, new: torch.Tensor) -> float:
        """Mean -log2 p(byte | the order - 1 bytes before it) over the bytes of `new` (N, n), each read after
        its row of `context` (N, P) (P >= order - 1 gives every byte its full history)."""
        full = torch.cat([torch.as_tensor(context), torch.as_tensor(new)], dim=1).long().cpu().numpy()
        p0 = full.shape[1] - new.shape[1]
        if new.shape[1] == 0:
            raise ValueError("no bytes to score")
        total = 0.0
        for i in range(p0, full.shape[1]):
            c = full[:, i]
            p = np.full(c.shape, 1.0 / 256)
            for k in range(1, self.order + 1):
                if i - (k - 1) < 0:
                    break
                h = np.zeros_like(c)
                for j in range(i - (k - 1), i):
                    h = h * 256 + full[:, j]
                tot, dist = self.totals[k - 1][h], self.distinct[k - 1][h]
                seen = tot > 0
                cnt = self.counts[k - 1][h, c]
                p = np.where(seen, (cnt + dist * p) / np.maximum(tot + dist, 1), p)
            total += float(-np.log2(p).sum())
        return total / new.numel()


@torch.no_grad()
def generative_score(
    model,
    baseline: ARBaselineLM,
    data,
    num: int = 64,
    prompt_len: int | None = None,
    new_len: int | None = None,
    seed: int = 0,
    temperature: float = 0.0,
    sigmas="middle",
    num_steps: int | None = None,
    ngram: NgramJudge | None = None,
) -> dict:
    """Scores of continuations of `num` prompts, the first prompt_len bytes of windows spread evenly over
    `data` (validation text).

    model: a BlockModel of an AutoregressiveLM (continued with `generate`), an ARBaselineLM (with
    `baseline_generate`), or None: the data's own continuation, the reference for both scores.
    Returns {"bits_per_byte_under_baseline": mean CE / ln 2 of the new_len continuation bytes under
    `baseline` given their prompts (lower: more plausible to the baseline; greedy text scores low by
    construction), "tokenize_fraction": the fraction of prompt + continuation fragments that `tokenizes`
    accepts}, and with `ngram` also "bits_per_byte_under_ngram" (the same bytes under that judge, which no
    model shaped). Defaults: prompt_len = seq_len // 2, new_len = seq_len - prompt_len. sigmas, num_steps:
    the BlockModel's inference steps (see `generate`).
    """
    seq_len = baseline.cfg.seq_len
    require_text(data)
    prompt_len = seq_len // 2 if prompt_len is None else prompt_len
    new_len = seq_len - prompt_len if new_len is None else new_len
    if prompt_len < 1 or new_len < 1 or prompt_len + new_len > min(seq_len, data.seq_len):
        raise ValueError(
            f"need prompt_len >= 1, new_len >= 1 and prompt_len + new_len <= seq_len ({seq_len}) and <= the "
            f"data's windows ({data.seq_len}); got prompt_len={prompt_len}, new_len={new_len}"
        )
    if num < 1:
        raise ValueError(f"num (prompts to continue) must be >= 1, got {num}")
    windows = data.batch(eval_windows(data, num))["tokens"]
    prompts = windows[:, :prompt_len]
    if model is None:
        cont = windows[:, prompt_len : prompt_len + new_len]
    elif isinstance(model, ARBaselineLM):
        cont = baseline_generate(model, prompts, new_len, temperature, seed)[:, prompt_len:]
    else:
        if model.task.config.seq_len != seq_len:
            raise ValueError(
                f"the model's seq_len {model.task.config.seq_len} differs from the baseline's {seq_len}"
            )
        cont = generate(model, prompts, new_len, temperature, seed, sigmas, num_steps)[:, prompt_len:]
    dev = next(baseline.parameters()).device
    full = torch.cat([prompts.to(dev), cont.to(dev)], dim=1)
    baseline.eval()
    logits = baseline(full)[:, prompt_len - 1 : -1].float()
    ce = F.cross_entropy(logits.reshape(-1, VOCAB), full[:, prompt_len:].reshape(-1), reduction="sum")
    bits = float(ce) / cont.numel() / math.log(2)
    out = {"bits_per_byte_under_baseline": bits, "tokenize_fraction": tokenize_fraction(prompts, cont)}
    if ngram is not None:
        out["bits_per_byte_under_ngram"] = ngram.bits(prompts, cont)
    return out
