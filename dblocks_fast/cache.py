"""Latent and text-embedding caches: encode a dataset once, keep the tensors, reuse them on the next run.

`cached_latents(images, vae_path, cache_dir)` encodes images with a diffusers VAE (`AutoencoderKL`) loaded
from a local folder; `cached_text_embeddings(captions, encoder_path, cache_dir)` encodes captions with a
transformers text encoder and its tokenizer from a local folder. Each writes its tensors as safetensors
shards in `cache_dir/<kind>-<encoder key>-<data key>/`, and an `index.json` last (the commit point: a
folder without it was cut short and is encoded anew).

The encoder key is a hash of the encoder folder's config files and weight files (so a changed config or
changed weights is another key); the data key a hash of the images' pixels or the captions. A second run
with the same encoder and data reads the shards and loads no model at all. When the cache folder holds a
cache of the same kind for the same data but another encoder (or the same encoder and other data), it is
stale: the message names it and the new one is written beside it (delete stale folders to free space).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from .checkpoint import atomic_save, atomic_write
from .data import ImageData

__all__ = [
    "CACHE_FORMAT",
    "cached_latents",
    "cached_text_embeddings",
    "data_key",
    "decode_latents",
    "default_cache_dir",
    "encoder_key",
    "latent_data",
]

CACHE_FORMAT = 1
SHARD_ROWS = 4096  # rows (images or captions) a shard
_CONFIG_FILES = (".json", ".txt", ".model")  # configs, vocabularies, sentencepiece models
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)


def encoder_key(path: str | os.PathLike) -> str:
    """A hash of an encoder folder: its config (and tokenizer) files and its weight files, by content."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"encoder folder {root} does not exist (expected a save_pretrained folder)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _CONFIG_FILES + _WEIGHT_FILES)
    if not any(p.name == "config.json" for p in files):
        raise ValueError(f"{root} holds no config.json: not a save_pretrained folder of a model")
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0")
        _hash_file(h, p)
    return h.hexdigest()


def data_key(data: torch.Tensor | list[str]) -> str:
    """A hash of the data: the images' float32 pixels and shape, or the captions in order."""
    h = hashlib.sha256()
    if isinstance(data, torch.Tensor):
        x = data.detach().to("cpu", torch.float32).contiguous()
        h.update(json.dumps(list(x.shape)).encode())
        h.update(x.numpy().tobytes())
    else:
        for c in data:
            h.update((c if c is not None else "").encode() + b"\0")
    return h.hexdigest()


def _folder(cache_dir: Path, kind: str, enc: str, dat: str) -> Path:
    return cache_dir / f"{kind}-{enc[:16]}-{dat[:16]}"


def _read(folder: Path) -> dict[str, torch.Tensor] | None:
    """The cache in a folder, or None if it has no complete one."""
    index = folder / "index.json"
    if not index.is_file():
        return None
    info = json.loads(index.read_text())
    if info.get("format") != CACHE_FORMAT:
        return None
    parts: dict[str, list[torch.Tensor]] = {}
    for shard in info["shards"]:
        for k, v in load_file(folder / shard).items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in parts.items()}


def _write(folder: Path, tensors: dict[str, torch.Tensor], info: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    n = next(iter(tensors.values())).shape[0]
    shards = []
    for i, start in enumerate(range(0, n, SHARD_ROWS)):
        name = f"shard-{i:05d}.safetensors"
        atomic_save(folder / name, {k: v[start : start + SHARD_ROWS] for k, v in tensors.items()})
        shards.append(name)
    info = {**info, "format": CACHE_FORMAT, "rows": n, "shards": shards}
    atomic_write(folder / "index.json", json.dumps(info, indent=1).encode())  # the commit point


def _stale(cache_dir: Path, kind: str, enc: str, dat: str) -> list[str]:
    """Lines about the complete caches of this kind that another encoder or other data made."""
    out = []
    for index in sorted(cache_dir.glob(f"{kind}-*/index.json")):
        try:
            info = json.loads(index.read_text())
        except (OSError, ValueError):
            continue
        e, d = info.get("encoder_key"), info.get("data_key")
        if (e, d) == (enc, dat):
            continue
        if d == dat:
            why = "another encoder made it (its config or weights changed)"
        elif e == enc:
            why = "it holds other data"
        else:
            continue
        out.append(f"{index.parent} is stale: {why}")
    return out


def _cached(
    kind: str,
    data: torch.Tensor | list[str],
    encoder_path,
    cache_dir,
    encode: Callable[[], dict[str, torch.Tensor]],
    log: Callable[[str], None],
) -> dict[str, torch.Tensor]:
    cache_dir = Path(cache_dir)
    enc, dat = encoder_key(encoder_path), data_key(data)
    folder = _folder(cache_dir, kind, enc, dat)
    found = _read(folder)
    if found is not None:
        log(f"{kind}: read from the cache {folder}")
        return found
    for line in _stale(cache_dir, kind, enc, dat):
        log(f"{kind}: {line}; encoding anew")
    tensors = encode()
    _write(
        folder,
        tensors,
        {"kind": kind, "encoder": str(Path(encoder_path).resolve()), "encoder_key": enc, "data_key": dat},
    )
    log(f"{kind}: encoded {len(data)} rows into the cache {folder}")
    return tensors


def cached_latents(
    images: torch.Tensor,
    vae_path: str | os.PathLike,
    cache_dir: str | os.PathLike,
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = print,
) -> torch.Tensor:
    """The latents of images (N, C, H, W) in [-1, 1] under the diffusers AutoencoderKL saved in vae_path:
    the mean of the encoder's distribution, shifted and scaled by the VAE's config (shift_factor,
    scaling_factor) as diffusers' pipelines do, float32 on the CPU, read from the cache when it holds them.
    One-channel images are repeated to the VAE's channels."""

    def encode() -> dict[str, torch.Tensor]:
        vae, scale, shift = _load_vae(vae_path, device)
        out = []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                x = images[start : start + batch_size].to(device, torch.float32)
                if x.shape[1] == 1 and vae.config.in_channels != 1:
                    x = x.repeat(1, vae.config.in_channels, 1, 1)
                mean = vae.encode(x).latent_dist.mean
                out.append(((mean - shift) * scale).float().cpu())
        return {"latents": torch.cat(out)}

    return _cached("latents", images, vae_path, cache_dir, encode, log)["latents"]


def cached_text_embeddings(
    captions: list[str],
    encoder_path: str | os.PathLike,
    cache_dir: str | os.PathLike,
    *,
    max_length: int = 77,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = print,
) -> dict[str, torch.Tensor]:
    """{"embeddings": (N, T, D) float32, "mask": (N, T) bool} of captions under the transformers text
    encoder (AutoModel) and tokenizer (AutoTokenizer) saved in encoder_path: its last hidden states, the
    captions padded or cut to max_length tokens; read from the cache when it holds them."""

    def encode() -> dict[str, torch.Tensor]:
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(encoder_path)
        model = AutoModel.from_pretrained(encoder_path).to(device).eval()
        embeddings, masks = [], []
        with torch.no_grad():
            for start in range(0, len(captions), batch_size):
                texts = [c or "" for c in captions[start : start + batch_size]]
                tok = tokenizer(
                    texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
                ).to(device)
                out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
                embeddings.append(out.last_hidden_state.float().cpu())
                masks.append(tok["attention_mask"].bool().cpu())
        return {"embeddings": torch.cat(embeddings), "mask": torch.cat(masks)}

    return _cached("text", captions, encoder_path, cache_dir, encode, log)


def default_cache_dir() -> Path:
    """$DBLOCKS_CACHE, else $XDG_CACHE_HOME/dblocks_fast, else ~/.cache/dblocks_fast."""
    if os.environ.get("DBLOCKS_CACHE"):
        return Path(os.environ["DBLOCKS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dblocks_fast"


def latent_data(
    data: ImageData,
    vae_path: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> ImageData:
    """The same examples with the images replaced by their latents (cached_latents), for a model that
    trains in the VAE's latent space (`dblocks-fast train --vae`)."""
    latents = cached_latents(data.images, vae_path, cache_dir or default_cache_dir(), log=log)
    return ImageData(
        latents, data.labels, data.num_classes, f"{data.name} latents", data.class_names, data.captions
    )


def decode_latents(
    latents: torch.Tensor,
    vae_path: str | os.PathLike,
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Images in [-1, 1] from latents made by cached_latents: the inverse shift and scaling, then the VAE's
    decoder."""
    vae, scale, shift = _load_vae(vae_path, device)
    out = []
    with torch.no_grad():
        for start in range(0, len(latents), batch_size):
            z = latents[start : start + batch_size].to(device, torch.float32) / scale + shift
            out.append(vae.decode(z).sample.float().cpu().clamp(-1, 1))
    return torch.cat(out)


def _load_vae(vae_path, device):
    """(vae, scaling_factor, shift_factor) of a diffusers AutoencoderKL folder, in eval mode on `device`:
    latents are (encoded - shift) * scale, as diffusers' pipelines make them."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_path).to(device).eval()
    return vae, vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
