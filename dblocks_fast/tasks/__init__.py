"""Tasks (what y and x are, the block network, the loss) and the presets the CLI trains.

One module (or package) a task: image_generation (DiT), classification (ViT), autoregressive (the byte LM
as a package: model, task, generation), masked_diffusion (MD4) and recurrent (the recurrent-depth
baseline). What a task must provide is the `Task` protocol in tasks.base, written down there once, with the
optional noise hooks (`OwnNoiseLevels`) and the discrete-target base class both ViT and AR LM build on.
tasks.text holds the checks and evaluation loop the byte LMs share, tasks.baseline the end-to-end
baselines' training loop. No task imports another task's private names, and nothing here imports the
trainer (the learning-rate schedule is dblocks_fast.lr).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from ..data import load_digits, load_images, load_text_or_builtin
from .autoregressive import ARBaselineLM, ARBlock, ARConfig, AutoregressiveLM
from .classification import ImageClassification, ViTBlock, ViTClassifier, ViTConfig
from .image_generation import DiTBlock, DiTConfig, ImageGeneration
from .masked_diffusion import MaskedDiffusionLM, MDMBlock, MDMConfig
from .text import byte_frequency_bits, learned

__all__ = [
    "DiTBlock",
    "DiTConfig",
    "ImageGeneration",
    "ImageClassification",
    "ViTBlock",
    "ViTClassifier",
    "ViTConfig",
    "AutoregressiveLM",
    "ARBlock",
    "ARBaselineLM",
    "ARConfig",
    "MaskedDiffusionLM",
    "MDMBlock",
    "MDMConfig",
    "Preset",
    "PRESETS",
    "task_from_dict",
]

_TASKS = {
    ImageGeneration.kind: (ImageGeneration, DiTConfig),
    ImageClassification.kind: (ImageClassification, ViTConfig),
    AutoregressiveLM.kind: (AutoregressiveLM, ARConfig),
    MaskedDiffusionLM.kind: (MaskedDiffusionLM, MDMConfig),
}


# settings added with a new default that changes what a saved block computes, and their value before
_BEFORE = {
    AutoregressiveLM.kind: {
        "cond_sigma_max": None,
        "prev_byte": False,
        "z_in_std": 0.02,
        "likelihood_skip": False,
        "prior_loss": 0.0,
        "z_input": True,
    },
    MaskedDiffusionLM.kind: {"rope": False},
}


def task_from_dict(d: dict):
    """Rebuild a task from its `to_dict()` (as saved in a run's manifest)."""
    kind = d.get("kind")
    if kind == "custom":  # a user's model (dblocks_fast.custom imports this package: import it here)
        from ..custom import CustomTask

        return CustomTask.from_config(d["config"])
    if kind not in _TASKS:
        raise ValueError(
            f"unknown task kind {kind!r} in the run manifest; this version knows {sorted(_TASKS)}"
        )
    cls, cfg_cls = _TASKS[kind]
    # a run saved before a setting existed was trained without it: its absence means the old behaviour
    return cls(cfg_cls(**{**_BEFORE.get(kind, {}), **d["config"]}))


@dataclass
class Preset:
    """A named recipe: how to load the data (built-in, or --data), the task, TrainConfig defaults."""

    description: str
    load_data: Callable  # (path or None, split "train" | "test", **data options) -> dataset
    make_task: Callable  # (training dataset) -> task
    task_kind: str  # the `kind` of the task make_task builds: which run folders sample/eval may read with it
    train_defaults: dict = field(default_factory=dict)  # TrainConfig fields this preset sets
    sample_defaults: dict = field(default_factory=dict)  # num_steps, sampler, cfg_scale for sample/eval
    evaluate: Callable | None = None  # (model, test data, seed) -> figures for eval.json; None: image scoring
    sample_text: Callable | None = None  # (model, n, seed) -> n generated strings (language models)


def _digits_or_images(path, split, vae=None, cache_dir=None, **options):
    """The built-in digits, or the user's images (data.load_images: a folder, a dataset, an .npz); with a
    VAE, their latents (cache.latent_data, encoded once into cache_dir)."""
    if cache_dir is not None and vae is None:
        raise ValueError("--cache-dir holds the latents of --vae; give --vae too, or leave --cache-dir out")
    if path is None:
        if options:
            flags = ", ".join("--" + k.replace("_", "-") for k in options)
            raise ValueError(f"{flags} apply to your own images (--data); the built-in digits take none")
        data = load_digits(split)
    else:
        data = load_images(path, split, **options)
    if vae is None:
        return data
    from ..cache import latent_data

    return latent_data(data, vae, cache_dir)


TEXT_SEQ_LEN = 64  # bytes per window of the pystdlib-* presets (the models' positions)
_PROMPTS = (b"def ", b"import ", b"class ", b"    return ", b"if __name__", b"for i in ")


def _pystdlib_or_text(path, split, **options):
    if options:
        flags = ", ".join("--" + k.replace("_", "-") for k in options)
        raise ValueError(f"{flags} apply to images; the text presets take none")
    # None: the standard library; a built-in corpus's name (data.TEXT_CORPORA, e.g. pydoc-topics); else a path
    return load_text_or_builtin(path, split, TEXT_SEQ_LEN)


def _text(rows) -> list[str]:
    return [bytes(r.tolist()).decode("utf-8", errors="replace") for r in rows]


def _ar_evaluate(model, test_data, seed=0, windows=1024, iterations=None) -> dict:
    """Both teacher-forced figures of the AR LM (tasks.autoregressive.bits_per_byte) and two continuations:
    block 0 alone at sigma_max (a likelihood: the context's prior) first, then the chain's last step (a
    sampler's logits, peaked on the byte it picks by the likelihood skip: no likelihood, often hundreds of
    bits where it picks wrong).

    iterations: None = one denoising step per block ("middle" sigmas); K = K steps along the sampling sigmas
    (the recurrent-depth preset: its one block applied K times)."""
    import torch

    from .autoregressive import bits_per_byte, generate

    steps = {} if iterations is None else {"sigmas": "boundary", "num_steps": iterations}
    last = bits_per_byte(model, test_data, max_windows=windows, seed=seed, **steps)
    first = bits_per_byte(
        model, test_data, max_windows=windows, seed=seed, sigmas=[model.schedule.sigma_max, 0]
    )
    prompt = test_data.batch(torch.tensor([0, len(test_data) // 2]))["tokens"][:, : TEXT_SEQ_LEN // 2]
    out = generate(model, prompt.to(model.device), TEXT_SEQ_LEN // 2, seed=seed, **steps)
    floor = byte_frequency_bits(test_data, windows)
    return {
        "bits_per_byte_first_block": first,
        "bits_per_byte_last_step": last,
        "byte_frequency_floor": floor,
        "first_block_learned": learned(first, floor),
        "validation_windows": min(windows, len(test_data)),
        "samples": _text(out.cpu()),
    }


def _ar_sample_text(model, n, seed=0, iterations=None) -> list[str]:
    import torch

    from .autoregressive import generate

    steps = {} if iterations is None else {"sigmas": "boundary", "num_steps": iterations}
    out = []
    for i in range(n):
        p = _PROMPTS[i % len(_PROMPTS)]
        prompt = torch.tensor([list(p)], device=model.device)
        out += _text(generate(model, prompt, TEXT_SEQ_LEN - len(p), seed=seed + i, **steps).cpu())
    return out


RECURRENT_ITERATIONS = 8  # K: how often pystdlib-recurrent applies its denoiser per byte at inference


def _mdm_evaluate(model, test_data, seed=0, windows=1024) -> dict:
    from .masked_diffusion import elbo_bits_per_byte, generate

    elbo = elbo_bits_per_byte(model, test_data, max_windows=windows, seed=seed)
    floor = byte_frequency_bits(test_data, windows)
    return {
        "elbo_bits_per_byte": elbo,
        "byte_frequency_floor": floor,
        "learned": learned(elbo, floor),
        "validation_windows": min(windows, len(test_data)),
        "samples": _text(generate(model, 2, seed=seed)),
    }


def _mdm_sample_text(model, n, seed=0) -> list[str]:
    from .masked_diffusion import generate

    return _text(generate(model, n, seed=seed))


PRESETS: dict[str, Preset] = {
    # 12 layers (DiT-S depth) split evenly for B = 1, 2, 3, 4, 6; about 4 minutes of training on 2 CPU cores.
    # Heun at 12 steps scored as well as at 30 on this model (sample accuracy and Frechet distance).
    "digits-dit": Preset(
        description="class-conditional DiT on scikit-learn's 8x8 digits (or --data: your images)",
        load_data=_digits_or_images,
        make_task=lambda data: ImageGeneration.for_data(
            data, hidden=64, heads=4, num_layers=12, patch_size=2
        ),
        task_kind=ImageGeneration.kind,
        train_defaults=dict(num_blocks=3, steps_per_block=1000, batch_size=128, lr=1e-3, warmup=100),
        sample_defaults=dict(num_steps=12, sampler="heun", cfg_scale=1.5),
    ),
    # The paper's ViT row scaled to the digits: 12 layers, B = 3, one denoising step per block at inference.
    "digits-vit": Preset(
        description="ViT classifier as DiffusionBlocks on scikit-learn's 8x8 digits (or --data: your images)",
        load_data=_digits_or_images,
        make_task=lambda data: ImageClassification.for_data(
            data, hidden=64, heads=4, num_layers=12, patch_size=2, emb_dim=64
        ),
        task_kind=ImageClassification.kind,
        train_defaults=dict(num_blocks=3, steps_per_block=1000, batch_size=128, lr=1e-3, warmup=100),
    ),
    # The paper's AR LM row scaled to bytes of the standard library: 12 layers, B = 4, gamma 0.1; about 5
    # minutes on one CPU thread. eval reports the last denoising step's and block 0's bits per byte.
    "pystdlib-ar": Preset(
        description="byte-level autoregressive LM on the Python standard library's source (or --data text)",
        load_data=_pystdlib_or_text,
        make_task=lambda data, **kw: AutoregressiveLM.for_data(
            data, **{"hidden": 64, "heads": 4, "num_layers": 12, "emb_dim": 64, **kw}
        ),
        task_kind=AutoregressiveLM.kind,
        train_defaults=dict(num_blocks=4, steps_per_block=300, batch_size=32, lr=1e-3, warmup=30, gamma=0.1),
        evaluate=_ar_evaluate,
        sample_text=_ar_sample_text,
    ),
    # The paper's recurrent-depth row: the 2 + 4 + 2 layers of a Huginn-style model (tasks.recurrent) as ONE
    # denoiser (B = 1, sigma drawn per step over the whole range, one forward pass a step), applied K = 8
    # times per byte at inference along the sampling sigmas. Its baseline is tasks.recurrent's recurrent
    # LM with truncated backprop; benchmarks/quality.py compares them.
    "pystdlib-recurrent": Preset(
        description="recurrent-depth byte LM trained as one denoiser, iterated 8 times at inference",
        load_data=_pystdlib_or_text,
        make_task=lambda data, **kw: AutoregressiveLM.for_data(
            data, **{"hidden": 64, "heads": 4, "num_layers": 8, "emb_dim": 64, **kw}
        ),
        task_kind=AutoregressiveLM.kind,
        train_defaults=dict(num_blocks=1, steps_per_block=300, batch_size=32, lr=1e-3, warmup=30, gamma=0.1),
        evaluate=functools.partial(_ar_evaluate, iterations=RECURRENT_ITERATIONS),
        sample_text=functools.partial(_ar_sample_text, iterations=RECURRENT_ITERATIONS),
    ),
    # The paper's MD4 row scaled down: 12 layers, B = 3, alpha(t) = 1 - t; about 3 minutes on one thread.
    "pystdlib-mdm": Preset(
        description="byte-level masked diffusion LM (MD4) on the standard library's source (or --data text)",
        load_data=_pystdlib_or_text,
        make_task=lambda data, **kw: MaskedDiffusionLM.for_data(
            data, **{"hidden": 64, "heads": 4, "num_layers": 12, **kw}
        ),
        task_kind=MaskedDiffusionLM.kind,
        train_defaults=dict(num_blocks=3, steps_per_block=400, batch_size=32, lr=1e-3, warmup=40),
        evaluate=_mdm_evaluate,
        sample_text=_mdm_sample_text,
    ),
}
