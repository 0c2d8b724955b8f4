"""`dblocks-fast train | sample | eval`: the command line. The only module that parses arguments."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import typing
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError, RunFolder, atomic_write
from .config import GROUPS, TrainConfig
from .data import ImageData
from .devices import DEVICES_HELP
from .distributed import DistributedError
from .samplers import SAMPLERS
from .tasks import PRESETS, ImageClassification
from .train import Preempted, TrainingDiverged

DEFAULT_PRESET = "digits-dit"
# the exit status after SIGTERM or SIGUSR1 (EX_TEMPFAIL: "try again later"); a requeued job resumes
EXIT_PREEMPTED = 75


# --- flags from TrainConfig ---------------------------------------------------------------------------------
def _int_list(s: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 2,2,2, got {s!r}") from None


def _positive_int(s: str) -> int:
    """An integer >= 1: a count of samples or steps (0 or less would draw nothing, or was rounded up)."""
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, got {s!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {n}")
    return n


def _opt_float(s: str) -> float | None:
    return None if s.lower() in ("none", "off", "0") else float(s)


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per TrainConfig setting, shown in --help under its group (noise, optimizer, ...)."""
    preset_set = {k for pr in PRESETS.values() for k in pr.train_defaults}
    sections = {None: parser.add_argument_group("what to train (TrainConfig)")}
    for name, cls in GROUPS.items():
        sections[name] = parser.add_argument_group(f"{name} (TrainConfig.{name})", cls.__doc__.strip())
    for group, f in TrainConfig.fields():
        p = sections[group]
        hint = typing.get_type_hints(GROUPS[group] if group else TrainConfig)[f.name]
        flag, h = "--" + f.name.replace("_", "-"), f.metadata["help"].replace("%", "%%")
        if f.name in ("out_dir", "progress"):
            continue  # --out and --no-progress below
        # SUPPRESS: a flag not given leaves no attribute, so preset defaults apply and "none" can mean None.
        # choices: the field's fixed set of values (config.py), listed by --help and checked by argparse
        kw = {"default": argparse.SUPPRESS}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if f.name == "num_blocks":
            p.add_argument("--blocks", "--num-blocks", dest="num_blocks", type=int, help=h, **kw)
        elif f.name == "layers":
            p.add_argument(flag, type=_int_list, help=h + " (e.g. 2,4,2)", **kw)
        elif f.name == "only_blocks":
            p.add_argument(flag, type=_int_list, help=h + " (e.g. 0,2)", **kw)
        elif f.name == "process":
            p.add_argument("--noise", "--process", dest="process", help=h, **kw)
        elif f.name == "grad_clip":
            p.add_argument(flag, type=_opt_float, help=h + " ('none' to disable)", **kw)
        elif hint is bool:
            no = "--no-" + f.name.replace("_", "-")
            p.add_argument(no, dest=f.name, action="store_false", help=f"{h} (on by default)", **kw)
        elif hint in (int, float, str):
            where = " unless the preset sets it" if f.name in preset_set else ""
            p.add_argument(flag, type=hint, help=f"{h} (default {f.default}{where})", **kw)
        else:
            raise TypeError(f"no CLI flag rule for TrainConfig.{f.name}: {hint}")  # a new field needs one
    p = sections["io"]
    p.add_argument(
        "--out", dest="out_dir", help="run folder (default runs/<preset>-b<B>)", default=argparse.SUPPRESS
    )
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar",
        default=argparse.SUPPRESS,
    )


def _preset(name: str):
    if name not in PRESETS:
        raise SystemExit(f"error: unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


# --- commands -----------------------------------------------------------------------------------------------
def train_config(args, preset) -> TrainConfig:
    """The TrainConfig of a train command line: TrainConfig's defaults, then the preset's, then the settings
    given (a --config file's, then the flags')."""
    given = {name: getattr(args, name) for name in TrainConfig.flat_names() if hasattr(args, name)}
    config = TrainConfig(**{**preset.train_defaults, **given})
    if config.io.out_dir is None:
        config.io.out_dir = str(Path("runs") / f"{args.preset}-b{config.num_blocks}")
    return config


# what the CLI records of a run beside its TrainConfig (cli.json): what makes the model and its data, which
# may not change when the run is resumed
DATA_OPTIONS = ("image_size", "image_column", "caption_column", "label_column", "vae", "cache_dir")
_CLI_RECORD = ("preset", "data", "model", "model_config", *DATA_OPTIONS)


_PATHS = ("data", "vae", "cache_dir")


def _cli_record(args) -> dict:
    return {k: (_abs(getattr(args, k, None)) if k in _PATHS else getattr(args, k, None)) for k in _CLI_RECORD}


def _check_same_cli(run: RunFolder, now: dict) -> None:
    """--resume: refuse a preset, data or model other than the run's (TrainConfig's own settings are
    compared by the trainer), listing every difference."""
    saved = run.read_json(RunFolder.CLI)
    if saved is None:
        return
    compared = [k for k in _CLI_RECORD if k != "cache_dir"]  # where the latents are kept changes no number
    diff = [(k, saved.get(k), now[k]) for k in compared if k in saved and saved.get(k) != now[k]]
    if diff:
        lines = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, a, b in diff)
        raise ValueError(f"cannot resume {run}: the configuration differs ({lines}). Use the saved values.")


def cmd_train(args) -> int:
    from .quality import evaluate
    from .train import Trainer

    preset = _preset(args.preset)
    options = _data_options(args)
    train_data = preset.load_data(args.data, "train", **options)
    test_data = preset.load_data(args.data, "test", **options)
    task = _own_task(args, train_data) if args.model else preset.make_task(train_data)
    config = train_config(args, preset)
    run = RunFolder(config.io.out_dir)
    resume = args.resume or args.extend
    record = _cli_record(args)
    folder = record["data"] and not record["data"].endswith(".npz") and not record["vae"]
    if folder and isinstance(train_data, ImageData):
        # the size the images were brought to (--image-size, or the first image's): later runs of eval and
        # sample, and a resume, read the folder at this size even if images are added
        record["image_size"] = train_data.image_shape[-1]
    if resume:
        _check_same_cli(run, record)
    distributed = config.runtime.distributed
    rank = 0 if distributed == "off" else int(os.environ.get("RANK", "0"))
    data_desc = f"{train_data.name}, {len(train_data)} examples"
    which = "" if config.only_blocks is None else f", blocks {','.join(map(str, config.blocks_to_train()))}"
    world = int(os.environ.get("WORLD_SIZE", "1")) if distributed != "off" else 1
    on = f" on {world} processes" if world > 1 else ""
    if rank == 0:
        print(f"training {args.preset} ({data_desc}) with B={config.num_blocks}{which}{on} into {run}")
    trainer = Trainer(task, train_data, config, resume=resume, extend=args.extend)
    if rank == 0:  # the run folder is this run's now (locked, its settings checked): record how it was made
        try:
            run.write_json(RunFolder.CLI, record)
        except BaseException:
            trainer.close()
            raise
    model = trainer.fit()
    if rank != 0:
        return 0  # rank 0 reports for everyone
    if args.no_eval:
        return 0
    offload = config.storage.offload
    if world > 1 or config.only_blocks is not None or offload != "none":
        from .sample import load

        if not run.read_manifest()["complete"]:
            print(
                f"{run} holds only some trained blocks; train the others (--only-blocks) and combine the "
                f"runs with dblocks-fast merge, then dblocks-fast eval --run RUN"
            )
            return 0
        device = None if config.runtime.device == "auto" else config.runtime.device
        if offload == "none":
            model = load(run, device)  # this process held only its own blocks
        else:  # the model did not fit on the device: sample with blocks streamed from host memory
            from .paging import StreamedBlockModel

            model = StreamedBlockModel(load(run, "cpu"), device)
    return _eval_and_report(model, run, preset, train_data, test_data, args, evaluate, options)


def cmd_bench(args) -> int:
    """Run benchmarks/ from a source checkout (the scripts are not installed with the package)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "__main__.py").is_file():
        raise FileNotFoundError(
            f"dblocks-fast bench runs the benchmark scripts of a source checkout, and {root} has none; clone "
            f"the repository and install it with pip install -e ."
        )
    cmd = [sys.executable, "-m", "benchmarks", *(["--quick"] if args.quick else [])]
    cmd += [*(["--out", str(Path(args.out).resolve())] if args.out else [])]
    cmd += [*(["--only", *args.only] if args.only else [])]
    return subprocess.run(cmd, cwd=root).returncode


def cmd_merge(args) -> int:
    from .checkpoint import merge_runs

    manifest = merge_runs(args.runs, args.out)
    steps = [e["steps"] for e in manifest["blocks"]]
    state = "complete" if manifest["complete"] else "not finished: resume it with --resume"
    print(f"merged {len(args.runs)} runs into {args.out}: block steps {steps} ({state})")
    return 0


def cmd_eval(args) -> int:
    from .quality import evaluate
    from .sample import load

    preset, data_path, options = _run_preset(args)
    model = load(args.run, args.device)
    train_data = preset.load_data(data_path, "train", **options)
    test_data = preset.load_data(data_path, "test", **options)
    run = RunFolder(args.run)
    return _eval_and_report(model, run, preset, train_data, test_data, args, evaluate, options)


def cmd_sample(args) -> int:
    from .sample import load, sample

    preset, data_path, options = _run_preset(args)
    model = load(args.run, args.device)
    if preset.sample_text is not None:  # a language model: print (and with --out .txt, write) generated text
        texts = preset.sample_text(model, args.per_class, args.sample_seed)
        for i, t in enumerate(texts):
            print(f"--- sample {i} ---\n{t}")
        if args.out and not args.out.endswith(".png"):
            atomic_write(Path(args.out), "\n\n".join(texts).encode())
            print(f"wrote {args.out}: {len(texts)} samples")
        return 0
    if model.task.kind == ImageClassification.kind:
        raise SystemExit(
            f"error: {args.run} is a classifier: there are no samples to draw; use dblocks-fast eval"
        )
    s = _sampling(preset, args, model)
    classes = preset.load_data(data_path, "test", **options).num_classes
    labels = np.repeat(np.arange(classes), args.per_class)
    images = _pixels(sample(model, labels, seed=args.sample_seed, **s), options)
    _save_grid(images.cpu().numpy(), classes, args.per_class, args.out)
    print(f"wrote {args.out}: {classes} classes x {args.per_class} samples ({_describe(s)})")
    return 0


def _eval_and_report(
    model, run: RunFolder, preset, train_data, test_data, args, evaluate, options: dict
) -> int:
    if preset.evaluate is not None:
        return _eval_preset(model, run, preset, test_data, args)
    if model.task.kind == ImageClassification.kind:
        return _eval_classifier(model, run, test_data)
    s = _sampling(preset, args, model)
    print(f"evaluating: {args.per_class} samples per class ({_describe(s)})")
    result = evaluate(
        model, train_data, test_data, run_dir=run, per_class=args.per_class, seed=args.sample_seed, **s
    )
    show = min(8, args.per_class)
    grid = result["samples"].reshape(train_data.num_classes, args.per_class, *train_data.image_shape)
    shown = _pixels(grid[:, :show].reshape(-1, *train_data.image_shape), options)
    picture = _save_grid(shown.numpy(), train_data.num_classes, show, run / RunFolder.SAMPLES)
    _log_eval(run, {k: v for k, v in result.items() if k != "samples"}, picture)
    _print_report(run, model.num_blocks, result)
    return 0


def _eval_classifier(model, run: RunFolder, test_data) -> int:
    """Test accuracy of a classification run: one denoising step per block (tasks.classification.predict)."""
    from .tasks.classification import evaluate_accuracy

    accuracy = evaluate_accuracy(model, test_data)
    result = {"test_accuracy": accuracy, "test_examples": len(test_data), "num_blocks": model.num_blocks}
    run.write_json(RunFolder.EVAL, result)
    _log_eval(run, result)
    print(f"test accuracy: {accuracy:.3f} on {len(test_data)} examples (B={model.num_blocks})")
    print(f"figures: {run / RunFolder.EVAL}")
    return 0


def _eval_preset(model, run: RunFolder, preset, test_data, args) -> int:
    """A preset's own figures (the language models: validation bits per byte), written to eval.json."""
    print(f"evaluating on {test_data.name} ({len(test_data)} windows)")
    result = {**preset.evaluate(model, test_data, seed=args.sample_seed), "num_blocks": model.num_blocks}
    samples = result.pop("samples", [])
    run.write_json(RunFolder.EVAL, result)
    _log_eval(run, result)
    for key, value in result.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    for i, t in enumerate(samples):
        print(f"--- sample {i} ---\n{t}")
    print(f"figures: {run / RunFolder.EVAL}")
    return 0


def _print_report(run: RunFolder, num_blocks: int, result: dict) -> None:
    rows = [
        ("sample accuracy (higher is better)", "sample_accuracy", "{:.3f}"),
        ("Frechet distance to test digits (lower)", "frechet_distance", "{:.2f}"),
        ("  real train digits, same count (floor)", "real_frechet", "{:.2f}"),
    ]
    cols = [(f"B={num_blocks} (this run)", result)]
    base = _find_baseline(run)
    if base is not None and num_blocks != 1:
        cols.append((f"B=1 baseline ({base[0]})", base[1]))
        differ = [k for k in _EVAL_SETTINGS if base[1].get(k) != result[k]]
    print(f"\nsamples: {run / RunFolder.SAMPLES}   figures: {run / RunFolder.EVAL}")
    print(f"{'':42s}" + "".join(f"{c[0]:>36s}" for c in cols))
    for label, key, fmt in rows:
        print(f"{label:42s}" + "".join(f"{fmt.format(c[1][key]):>36s}" for c in cols))
    if base is not None and num_blocks != 1 and differ:
        print(
            f"\nnote: the baseline was scored with other {', '.join(differ)}; for a fair comparison run "
            f"dblocks-fast eval --run {base[0]} with this run's settings"
        )
    if base is None and num_blocks != 1:
        print(
            f"\nno B=1 baseline found next to {run}; make one with: dblocks-fast train --blocks 1 "
            f"--out {_baseline_path(run)}"
        )


_EVAL_SETTINGS = ("sampler", "num_steps", "cfg_scale", "num_samples", "seed")


def _baseline_path(run: RunFolder) -> Path:
    """Where the B=1 run beside this one (<name>-b1) is."""
    return run.path.parent / (run.path.name.rsplit("-b", 1)[0] + "-b1")


def _find_baseline(run: RunFolder):
    """The eval.json of the B=1 run beside this one (<name>-b1), trained with the same model and steps."""
    if "-b" not in run.path.name:
        return None
    base = RunFolder(_baseline_path(run))
    try:
        mine, theirs = (d.read_json(RunFolder.CONFIG) for d in (run, base))
        same = (
            mine["task"] == theirs["task"]
            and mine["train"]["steps_per_block"] == theirs["train"]["steps_per_block"]
        )
        result = base.read_json(RunFolder.EVAL)
        return (str(base), result) if same and result is not None else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _run_preset(args):
    """The preset, data path and data options (--image-size, columns) of a run, from its cli.json unless
    given on the command line (a --data given there brings its own options, if any)."""
    run = RunFolder(args.run)
    if not run.path.is_dir():
        raise CheckpointError(f"run folder {args.run} does not exist")
    info = run.read_json(RunFolder.CLI) or {}
    data = getattr(args, "data", None)
    options = _data_options(args) if data else {k: info[k] for k in DATA_OPTIONS if info.get(k) is not None}
    data = data or info.get("data")
    name = args.preset or info.get("preset") or DEFAULT_PRESET
    preset = _preset(name)
    _check_preset_fits(run, name, info.get("preset"))
    return preset, data, options


def _pixels(samples, options: dict):
    """Samples as images: decoded with the run's VAE where it trained on latents."""
    if not options.get("vae"):
        return samples.cpu()
    from .cache import decode_latents

    return decode_latents(samples.cpu(), options["vae"])


def _data_options(args) -> dict:
    """The data flags given (--image-size, --image-column, ...): what preset.load_data takes beside a path."""
    return {k: getattr(args, k) for k in DATA_OPTIONS if getattr(args, k, None) is not None}


def _check_preset_fits(run: RunFolder, name: str, recorded: str | None) -> None:
    """Refuse a --preset made for another kind of model than the run's (its sampling settings, data and
    figures would not fit it). A model of the user's (kind "custom") takes the data and settings of the
    preset it was trained with, so it fits the presets of that preset's kind; without cli.json (a run of
    the Python API) there is nothing to compare it with."""
    kind = run.read_manifest()["task"].get("kind")
    if kind == "custom":
        if recorded not in PRESETS:
            return
        kind = PRESETS[recorded].task_kind
    if PRESETS[name].task_kind == kind:
        return
    fits = sorted(n for n, p in PRESETS.items() if p.task_kind == kind)
    trained = f" (trained with --preset {recorded})" if recorded else ""
    do = [f"leave --preset out (the run folder records {recorded})"] if recorded else []
    do += [f"pass --preset {' or '.join(fits)}"] if fits else []
    raise ValueError(
        f"{run} holds a model of kind {kind!r}{trained}, but --preset {name} is for models of kind "
        f"{PRESETS[name].task_kind!r}: {', or '.join(do) or 'this version has no preset for it'}"
    )


def _own_task(args, train_data):
    """The task of `--model module:factory` (a network of the user's, dblocks_fast.custom) on the data."""
    from .custom import CustomTask

    try:
        settings = json.loads(args.model_config) if args.model_config else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--model-config must be a JSON object of the factory's settings: {e}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"--model-config must be a JSON object of the factory's settings, got {settings!r}")
    return CustomTask.for_data(train_data, args.model, settings)


def _sampling(preset, args, model) -> dict:
    """The sampler settings: the preset's, then the flags given; no guidance by default for a model of the
    user's that names no 'no condition' value."""
    s = {**preset.sample_defaults, **_given(args, ("num_steps", "sampler", "cfg_scale"))}
    if getattr(model.task, "null_label", 0) is None and args.cfg_scale is None:
        s["cfg_scale"] = 1.0
    s["num_steps"] = _round_steps(s["num_steps"], model.num_blocks)
    return s


def _describe(s: dict) -> str:
    return f"{s['sampler']}, {s['num_steps']} steps, cfg scale {s['cfg_scale']}"


def _given(args, names) -> dict:
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def _round_steps(n: int, b: int) -> int:
    """Sampling steps must be a multiple of B (each block gets the same number); n >= 1 (_positive_int)."""
    return b * math.ceil(n / b)


def _abs(path):
    return None if path is None else os.path.abspath(path)


def _grid(images: np.ndarray, rows: int, cols: int, scale: int = 4) -> np.ndarray:
    """Images (rows * cols, C, H, W) in [-1, 1] as one (H', W', C) picture in [0, 1], a row per class,
    upscaled, with a white line around each image."""
    n, c, h, w = images.shape
    x = ((np.clip(images, -1, 1) + 1) / 2).reshape(rows, cols, c, h, w)
    pad = np.ones((rows, cols, c, h + 2, w + 2))
    pad[:, :, :, 1:-1, 1:-1] = x
    grid = pad.transpose(0, 3, 1, 4, 2).reshape(rows * (h + 2), cols * (w + 2), c)
    return grid.repeat(scale, 0).repeat(scale, 1)


def _save_grid(images: np.ndarray, rows: int, cols: int, out, scale: int = 4) -> np.ndarray:
    """Write images (rows * cols, C, H, W) in [-1, 1] as one PNG (see _grid); returns the picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = _grid(images, rows, cols, scale)
    c = grid.shape[-1]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if c == 1:
        plt.imsave(out, grid[..., 0], cmap="gray", vmin=0, vmax=1)
    else:
        plt.imsave(out, grid[..., :3])
    return grid


def _log_eval(run: RunFolder, figures: dict, grid: np.ndarray | None = None) -> None:
    """Send an evaluation's scores (and sample grid) to the run's logger (its config's io.log), at the
    blocks' last step."""
    info = run.read_json(RunFolder.CONFIG) or {}
    config = TrainConfig.from_dict(info["train"]) if "train" in info else TrainConfig()
    if config.io.log == "none":
        return
    from .loggers import open_logger

    logger = open_logger(config.io.log, run.path, asdict(config))
    try:
        step = config.steps_per_block
        scores = {
            f"eval/{k}": float(v)
            for k, v in figures.items()
            if isinstance(v, (int, float)) and k not in _EVAL_SETTINGS  # figures, not the sampler's settings
        }
        logger.scalars(scores, step)
        if grid is not None:
            logger.image("eval/samples", grid, step)
    finally:
        logger.close()


# --- argument parsing ---------------------------------------------------------------------------------------
def _add_sample_flags(p: argparse.ArgumentParser, per_class: int) -> None:
    p.add_argument(
        "--num-steps",
        "--steps",
        dest="num_steps",
        type=_positive_int,
        help="sampling steps, 1 or more, rounded up to a multiple of B",
    )
    p.add_argument(
        "--sampler",
        choices=tuple(SAMPLERS),
        help="ODE solver: 'euler' (one network call a step) or 'heun' (two, second order); default: the "
        "preset's",
    )
    p.add_argument(
        "--cfg-scale", type=float, help="classifier-free guidance scale (1 = none); default: the preset's"
    )
    p.add_argument(
        "--per-class",
        type=_positive_int,
        default=per_class,
        help=f"samples per class; language models: samples in all (default {per_class})",
    )
    # its own dest: `train --sample-seed` must not set the training seed (TrainConfig.seed, --seed)
    p.add_argument(
        "--sample-seed",
        dest="sample_seed",
        type=int,
        default=0,
        help="seed of the sampling noise (default 0)",
    )


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--image-size",
        type=_positive_int,
        help="image folders and datasets: the side of the square images the model is built for; each image's "
        "shorter side is resized to it and the center cropped (default: the first image's shorter side)",
    )
    p.add_argument("--image-column", help="Hugging Face dataset: the column of the images (default 'image')")
    p.add_argument(
        "--label-column",
        help="Hugging Face dataset: the column of the class labels, integers or names (default 'label' if "
        "there is one; without it all images are one class)",
    )
    p.add_argument(
        "--caption-column", help="Hugging Face dataset: the column of the captions (default: none)"
    )
    p.add_argument(
        "--vae",
        help="train in a VAE's latent space: a diffusers AutoencoderKL folder (save_pretrained) that encodes "
        "the images once (cached, see --cache-dir) and decodes the sample grids; eval's scores are then "
        "computed on latents",
    )
    p.add_argument(
        "--cache-dir",
        help="where --vae's latents are kept, a folder per encoder and data (default $DBLOCKS_CACHE or "
        "~/.cache/dblocks_fast)",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dblocks-fast", description="DiffusionBlocks: train transformers block by block."
    )
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train", help="train a preset (default: the DiT on built-in digits), then sample and score it"
    )
    t.add_argument(
        "--config",
        help="a TOML (.toml), YAML (.yaml) or JSON file of settings: any flag below by its setting name "
        "(num_blocks = 3, preset = 'digits-dit', data = 'images/'), TrainConfig's groups also as tables "
        "([optimizer] lr = 2e-3); flags given here override the file",
    )
    t.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help=f"what to train: a model, its data and its settings' defaults; one of: "
        f"{', '.join(sorted(PRESETS))} (default {DEFAULT_PRESET})",
    )
    t.add_argument(
        "--data",
        help="your own data instead of the built-in set. Image presets: a folder of PNG/JPEG/WebP images "
        "(class subfolders give the labels, a .txt beside an image its caption), a Hugging Face dataset "
        "(a save_to_disk folder, a .parquet file or a folder of them), or an .npz with images and labels. "
        "pystdlib-* presets: a text file or a folder of text files, or the built-in pydoc-topics (English "
        "prose of Python's help() topics). Split by a hash of each path",
    )
    _add_data_flags(t)
    t.add_argument(
        "--model",
        help="a network of your own instead of the preset's: 'module:factory', a function that returns a "
        "dblocks_fast.Network or Blocks (see dblocks_fast.custom); the preset still gives the data",
    )
    t.add_argument("--model-config", help="the factory's settings as a JSON object, e.g. '{\"hidden\": 64}'")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument(
        "--extend",
        action="store_true",
        help="train the run in --out further, to a larger --steps-per-block (implies --resume); each block's "
        "learning rate then follows the warm-up + cosine schedule of the new length from the step it reached",
    )
    t.add_argument("--no-eval", action="store_true", help="skip sampling and scoring after training")
    _add_train_flags(t)
    _add_sample_flags(t, per_class=50)

    device_help = f"torch device: {DEVICES_HELP} (default auto: cuda if available, else cpu)"
    s = sub.add_parser("sample", help="draw a grid of samples, one row per class")
    s.add_argument("--run", required=True, help="the run folder to draw from (a train --out)")
    s.add_argument(
        "--out", default="grid.png", help="PNG to write (language models: a .txt to write the samples to)"
    )
    s.add_argument("--device", default=None, help=device_help)
    s.add_argument("--preset", help="preset the run used (default: from the run folder)")
    _add_sample_flags(s, per_class=8)

    e = sub.add_parser(
        "eval", help="score a run: sample accuracy and Frechet distance of classifier features"
    )
    e.add_argument("--run", required=True, help="the run folder to score (a train --out)")
    e.add_argument("--device", default=None, help=device_help)
    e.add_argument("--preset", help="preset the run used (default: from the run folder)")
    e.add_argument("--data", help="data the run was trained on (default: from the run folder)")
    _add_data_flags(e)
    _add_sample_flags(e, per_class=50)

    b = sub.add_parser("bench", help="run the benchmarks (python -m benchmarks) and rewrite the results page")
    b.add_argument("--quick", action="store_true", help="small sizes: every benchmark in a few minutes")
    b.add_argument("--out", help="results folder (default benchmarks/results)")
    b.add_argument("--only", nargs="+", help="just these benchmark scripts")

    m = sub.add_parser(
        "merge", help="assemble one run folder from runs that trained disjoint blocks (--only-blocks)"
    )
    m.add_argument("runs", nargs="+", help="run folders, each holding some trained blocks")
    m.add_argument(
        "--out",
        required=True,
        help="the new run folder: must not exist, or be empty, or hold this merge stopped midway (it is "
        "finished) or done",
    )
    return ap


def train_parser(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `train` subcommand's parser of build_parser()."""
    return next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with `train --config FILE`'s settings under it: a file's settings take the place
    of the defaults (the preset's and TrainConfig's), and the flags given override both. Raises ValueError
    for a bad file, before anything is done."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if getattr(args, "config", None):
        train = train_parser(ap)
        train.set_defaults(**settings_from_file(train, args.config))
        args = ap.parse_args(argv)
    return args


# settings a file may not hold: what to do with the run, not how it is made
_NOT_IN_FILES = ("help", "config", "resume", "extend")


def settings_from_file(parser: argparse.ArgumentParser, path: str) -> dict:
    """{flag dest: value} from a settings file (config.read_settings), each value read as its flag reads
    its text, so a file and the equivalent flags give the same settings. Names are the settings' (the flag
    without '--': steps_per_block or steps-per-block; out_dir or out; a switch by its setting: progress =
    false); an unknown name is an error that names it and the names there are."""
    from .config import read_settings

    actions, names = {}, {}
    for a in parser._actions:
        if a.dest in _NOT_IN_FILES:
            continue
        actions[a.dest] = a
        names[a.dest] = a.dest
        longs = [o for o in a.option_strings if o.startswith("--")]
        if a.nargs != 0 and longs:  # not a switch: --no-progress in a file would read as progress = true
            names.setdefault(longs[0][2:].replace("-", "_"), a.dest)
    out = {}
    for key, value in read_settings(path).items():
        if key not in names:
            import difflib

            close = difflib.get_close_matches(key, names, n=3)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise ValueError(
                f"--config {path}: unknown setting {key!r}{hint}; the settings are: "
                f"{', '.join(sorted(actions))}"
            )
        dest = names[key]
        if dest in out:
            raise ValueError(f"--config {path}: {dest!r} is set twice (as {key!r} too)")
        out[dest] = _file_value(actions[dest], key, value, path)
    return out


def _file_value(action: argparse.Action, key: str, value, path: str):
    """A file's value for a flag, converted and checked as the flag's text would be."""

    def bad(expected: str):
        return ValueError(f"--config {path}: {key} must be {expected}, got {value!r}")

    if action.nargs == 0:  # a switch (--no-eval, --no-progress): its setting is true or false
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if value is None:  # YAML null: the setting's "none", where it has one
        if action.type in (_opt_float, _int_list) or action.default is None:
            return None
        raise bad("a value (it has no 'none')")
    if action.type in (None, str):
        if not isinstance(value, str):
            raise bad("text")
        text = value
    elif action.type is _int_list and isinstance(value, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise bad("a list of whole numbers")
        text = ",".join(map(str, value))
    elif isinstance(value, bool) or isinstance(value, (list, dict)):
        raise bad("a number" if action.type in (int, float, _positive_int, _opt_float) else "a value")
    else:
        text = value if isinstance(value, str) else repr(value)
    try:
        result = text if action.type in (None, str) else action.type(text)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
        if action.type in (int, float):
            raise bad("a whole number" if action.type is int else "a number") from None
        raise ValueError(f"--config {path}: {key} = {value!r}: {e}") from None
    if action.choices is not None and result not in action.choices:
        raise bad(f"one of {', '.join(map(str, action.choices))}")
    return result


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except (ValueError, FileNotFoundError) as e:  # a bad --config file
        print(f"error: {e}", file=sys.stderr)
        return 2
    commands = {
        "train": cmd_train,
        "sample": cmd_sample,
        "eval": cmd_eval,
        "merge": cmd_merge,
        "bench": cmd_bench,
    }
    try:
        return commands[args.command](args)
    except (
        ValueError,
        FileNotFoundError,
        FileExistsError,
        CheckpointError,
        TrainingDiverged,
        DistributedError,
    ) as e:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        who = f" (rank {os.environ.get('RANK', '?')} of {world})" if world > 1 else ""
        print(f"error{who}: {e}", file=sys.stderr)
        return 2
    except Preempted as e:  # SIGTERM or SIGUSR1: the step finished and the run was saved
        print(f"\nstopped by {e.signal}; resume with --resume", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
