"""Pretrained diffusers transformers, trained block-wise with flow matching.

    pip install -e ".[diffusers]"
    dblocks-fast train --model dblocks_fast.integrations.diffusers:transformer \\
        --model-config '{"path": "path/to/transformer"}' --noise flow ...

`transformer(path)` is a model factory for `dblocks_fast.CustomTask` (see dblocks_fast/custom.py): it reads
the model's config.json (no weights) to learn its class and its layers, and builds block b, when the trainer
asks for it, as a copy of the pretrained model that holds only the layers [l_b, l_{b+1}): the model's own
embeddings, block b's share of its layers, the model's own output norm and projection, called through the
model's own forward. With B = 1 a block is the pretrained model. Layers are the `nn.ModuleList`s
`transformer_blocks` and then `single_transformer_blocks` (Flux), in the order the forward runs them.
A block reads only its own tensors from the model's safetensors files (one file, or the shards of an
index), so host memory never holds the whole model; with offload="disk" a LoRA block's frozen base then
waits on disk, and with "host" in (pinned) host memory, once.

Supported, and tested with tiny random configs loaded through `from_pretrained`: DiTTransformer2DModel,
PixArtTransformer2DModel, SD3Transformer2DModel, FluxTransformer2DModel. Other classes with those layer lists
are split the same way, called with `timestep` = 1000 t (name a class's scale in TIMESTEP_SCALE otherwise).

How a block is called: the noise process is flow matching (t in (0, 1), x_t = (1 - t) x + t e, a velocity
target, as SD3 and Flux are trained); the block gets x_t as `hidden_states`, the timestep in the model's own
scale (1000 t; Flux: t, which it scales itself), and the batch's condition: a class label as `class_labels`
(DiT), or, for text-conditioned models, a dict of the forward's keyword arguments (`encoder_hidden_states`,
`pooled_projections`, `img_ids`, ... ; give CustomTask `cond=[...]` the batch keys). A model that predicts
a learned variance too (DiT's out_channels = 2 x in_channels) is trained on the first in_channels channels.

DiT's label dropout (its LabelEmbedding draws from the global random generator) is turned off in the blocks;
the task drops labels instead, with the trainer's per-step generator and the model's own rate and null class,
so that runs stay bit-for-bit reproducible and blocks independent.

`PipelineTransformer(model)` puts a trained run back into a diffusers pipeline: it has the transformer's
config and forward signature and routes each call to the block that owns its timestep
(`pipe.transformer = PipelineTransformer(dblocks_fast.load(run))`; the pipeline's scheduler must be a flow
matching one, e.g. FlowMatchEulerDiscreteScheduler). With a StreamedBlockModel only the active block's layers
are on the device.

Two modes (CustomTask's `mode`): "independent", every block a whole model copy with its own embeddings and
head; "shared", one frozen copy of the embeddings and head (`frame`) for all blocks, which then hold their
layers alone (DiffusersLayers).

LoRA (`lora={...}`, peft): adapters on the blocks' linear layers, the rest frozen; `export_lora` writes them
in peft's format under the whole model's layer names.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
from pathlib import Path

import torch
from torch import nn

try:
    import diffusers
    from diffusers.models.embeddings import LabelEmbedding
except ImportError as e:  # an optional extra
    raise ImportError(
        f"dblocks_fast.integrations.diffusers needs the diffusers package ({e}); install it with "
        f"pip install -e '.[diffusers]'"
    ) from e

from ..custom import Blocks

__all__ = [
    "DiffusersBlock",
    "DiffusersLayers",
    "PipelineTransformer",
    "add_lora",
    "export_lora",
    "layer_lists",
    "split",
    "transformer",
]

LAYER_LISTS = ("transformer_blocks", "single_transformer_blocks")  # in the order the forward runs them
TIMESTEP_SCALE = {  # the model's timestep for flow time t: scale x t
    "DiTTransformer2DModel": 1000.0,
    "PixArtTransformer2DModel": 1000.0,
    "SD3Transformer2DModel": 1000.0,
    "FluxTransformer2DModel": 1.0,  # Flux multiplies its timestep by 1000 itself
}
FLOW_C_NOISE = 4.0  # schedule.FlowMatching.inputs gives the network c_noise = 4 t


def model_config(path, subfolder: str | None = None) -> tuple[type, dict]:
    """(class, config) of the diffusers model saved at `path` (its config.json; no weights are read)."""
    folder = Path(path) / (subfolder or "")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} holds no config.json: give the folder a diffusers model was saved to "
            f"(save_pretrained), or the pipeline's folder with subfolder='transformer'"
        )
    config = json.loads((folder / "config.json").read_text())
    name = config.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ValueError(f"{folder}/config.json names class {name!r}, which is not a diffusers model class")
    return cls, dict(config)


def layer_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The model's layer lists (name, ModuleList), in the order its forward runs them."""
    found = [
        (n, getattr(model, n)) for n in LAYER_LISTS if isinstance(getattr(model, n, None), nn.ModuleList)
    ]
    if not found or not sum(len(layers) for _, layers in found):
        raise ValueError(
            f"{type(model).__name__} has no layers to split into blocks: expected an nn.ModuleList "
            f"'transformer_blocks' (and, Flux-style, 'single_transformer_blocks') of transformer layers"
        )
    return found


def _share(model: nn.Module, layers: range) -> dict[str, nn.ModuleList]:
    """{list name: a ModuleList of the layers `layers` in it} (indices over the layer lists, in order)."""
    lists = layer_lists(model)
    total = sum(len(lst) for _, lst in lists)
    if len(layers) < 1 or layers.start < 0 or layers.stop > total:
        raise ValueError(f"layers {layers} are not within {type(model).__name__}'s {total} layers")
    start, kept = 0, {}
    for name, lst in lists:
        kept[name] = nn.ModuleList(lst[i - start] for i in layers if start <= i < start + len(lst))
        start += len(lst)
    return kept


@contextlib.contextmanager
def _holding(model: nn.Module, lists: dict[str, nn.ModuleList]):
    """`model` with its layer lists replaced by `lists` for the `with`, then as it was."""
    saved = {name: model._modules[name] for name in lists}
    try:
        model._modules.update(lists)
        yield model
    finally:
        model._modules.update(saved)


def split(model: nn.Module, layers: range) -> nn.Module:
    """A copy of `model` that holds only the layers `layers` (indices over its layer lists, in order), its
    embeddings and output head; `model` itself is left as it was."""
    with _holding(model, _share(model, layers)):
        return copy.deepcopy(model)  # copies only these layers


def frame(model: nn.Module) -> nn.Module:
    """A copy of `model` without layers: its embeddings and output head, what mode "shared" shares."""
    with _holding(model, {name: nn.ModuleList() for name, _ in layer_lists(model)}):
        return copy.deepcopy(model)


def cut(model: nn.Module, layers: range) -> nn.ModuleDict:
    """Copies of the layers `layers` of `model` alone, under their list names (a block of mode "shared")."""
    return copy.deepcopy(nn.ModuleDict(_share(model, layers)))


@functools.lru_cache(maxsize=1)
def _pretrained(path: str, subfolder: str | None, dtype: str, weights: str = "pretrained") -> nn.Module:
    """The whole model, loaded once per process onto the CPU: through from_pretrained when its weights are
    not safetensors files (`_part` reads only a block's share otherwise); weights="random": the class's own
    initialisation from the config alone, seeded (seed 0)."""
    cls, config = model_config(path, subfolder)
    with torch.device("cpu"):  # also when a block is asked for on the meta device (sizes only)
        if weights == "random":
            with torch.random.fork_rng(devices=[]), _default_dtype(dtype):
                torch.manual_seed(0)
                model = cls.from_config(config)
        else:
            model = cls.from_pretrained(path, subfolder=subfolder, torch_dtype=getattr(torch, dtype))
    return model.eval().requires_grad_(False)


def _weight_files(path: str, subfolder: str | None) -> dict[str, Path] | None:
    """{tensor name: the safetensors file holding it} of a saved model (one file or an index of shards), or
    None when its weights are in another form (.bin, a variant): then the whole model is loaded."""
    from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME
    from safetensors import safe_open

    folder = Path(path) / (subfolder or "")
    if (folder / SAFE_WEIGHTS_INDEX_NAME).is_file():
        index = json.loads((folder / SAFE_WEIGHTS_INDEX_NAME).read_text())
        return {k: folder / f for k, f in index["weight_map"].items()}
    if (folder / SAFETENSORS_WEIGHTS_NAME).is_file():
        with safe_open(folder / SAFETENSORS_WEIGHTS_NAME, framework="pt") as f:
            return dict.fromkeys(f.keys(), folder / SAFETENSORS_WEIGHTS_NAME)
    return None


@functools.lru_cache(maxsize=1)
def _empty(path: str, subfolder: str | None) -> nn.Module:
    """The model with its parameters on the meta device and its buffers real: what `_part` cuts a block
    from and fills. A buffer the files do not hold stays as the class computes it (float32, as
    from_pretrained leaves it whatever the weights' dtype)."""
    from accelerate import init_empty_weights

    cls, config = model_config(path, subfolder)
    with torch.device("cpu"), init_empty_weights(include_buffers=False):
        model = cls.from_config(config)
    return model.eval().requires_grad_(False)


def _part(path: str, subfolder: str | None, dtype: str, cutter, layers: range | None) -> nn.Module:
    """`cutter(model)` (split, frame or cut) of the pretrained model, with only that part's weights read
    from the model's safetensors files: building block b reads block b's layers, never the whole model, so
    host memory holds one block's share at a time (then the storage pages it)."""
    files = _weight_files(path, subfolder)
    if files is None:
        return cutter(_pretrained(path, subfolder, dtype))
    from safetensors import safe_open

    model = _empty(path, subfolder)
    part = cutter(model)
    # a layer's index in the part -> its index in the model's own lists, which name it in the files
    origin = {}
    if layers is not None:
        start = 0
        for name, lst in layer_lists(model):
            origin[name] = [i - start for i in layers if start <= i < start + len(lst)]
            start += len(lst)

    def saved_name(name: str) -> str:
        head, _, rest = name.partition(".")
        if head in origin:
            index, _, rest = rest.partition(".")
            return f"{head}.{origin[head][int(index)]}.{rest}"
        return name

    want = getattr(torch, dtype)
    handles: dict[Path, object] = {}
    with contextlib.ExitStack() as stack:
        for mod_name, module in part.named_modules():
            for kind in ("_parameters", "_buffers"):
                for name, t in list(getattr(module, kind).items()):
                    key = saved_name(f"{mod_name}.{name}" if mod_name else name)
                    if t is None or (kind == "_buffers" and key not in files):
                        continue  # a buffer the class computes (kept from construction)
                    if key not in files:
                        raise KeyError(
                            f"{Path(path) / (subfolder or '')} holds no tensor {key!r}, which "
                            f"{type(model).__name__} has: is it a checkpoint of this class and config?"
                        )
                    if files[key] not in handles:
                        handles[files[key]] = stack.enter_context(safe_open(files[key], framework="pt"))
                    value = handles[files[key]].get_tensor(key)
                    value = value.to(want) if value.is_floating_point() else value
                    if kind == "_parameters":
                        value = nn.Parameter(value, requires_grad=False)
                    getattr(module, kind)[name] = value
    return part


@functools.lru_cache(maxsize=1)
def _skeleton(path: str, subfolder: str | None, dtype: str) -> nn.Module:
    """The model on the meta device: what a block built for its sizes alone is cut from."""
    cls, config = model_config(path, subfolder)
    with _default_dtype(dtype), torch.device("meta"):
        return cls.from_config(config)


@contextlib.contextmanager
def _default_dtype(dtype: str):
    """Modules built in the `with` get parameters of `dtype` (diffusers warns of a .to() after building)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        yield
    finally:
        torch.set_default_dtype(default)


DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections of every supported class


def add_lora(
    model: nn.Module, rank: int = 8, alpha: float | None = None, targets=DEFAULT_TARGETS, name: str = ""
) -> nn.Module:
    """Add LoRA adapters (peft, adapter name "default") to `model`'s modules named by `targets` (peft's
    target_modules: names or name suffixes) and freeze everything else: only the adapters train."""
    from peft import LoraConfig, inject_adapter_in_model

    if not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"the LoRA rank must be a positive integer, got {rank!r}")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets), lora_dropout=0.0)
    try:
        inject_adapter_in_model(config, model)
    except ValueError as e:
        raise ValueError(
            f"LoRA targets {list(targets)} match no module of {name or type(model).__name__} ({e}); name its "
            f"linear layers, e.g. {list(DEFAULT_TARGETS)} for the attention projections"
        ) from None
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
        if p.requires_grad:
            p.data = p.data.float()  # the adapters train in float32 (AdamW's state too), whatever the base
    return model


def _no_label_dropout(module: nn.Module) -> nn.Module:
    for m in module.modules():  # the task drops labels, with the trainer's generator
        if isinstance(m, LabelEmbedding):
            m.dropout_prob = 0.0
    return module


def _run(model: nn.Module, x: torch.Tensor, c_noise: torch.Tensor, cond, timestep_scale: float):
    """The model's forward as a CustomTask block: x_t, the timestep in the model's scale, the condition."""
    dtype = next(p.dtype for n, p in model.named_parameters() if ".lora_" not in n)  # the base's
    t = c_noise.float() / FLOW_C_NOISE
    if isinstance(cond, dict):
        kwargs = {}
        for key, value in cond.items():
            if key in ("img_ids", "txt_ids"):  # Flux's positions are per sequence: the batch's first row's
                value = value[0] if value.ndim == 3 else value
            elif value.is_floating_point():  # text embeddings: in the base's dtype
                value = value.to(dtype)
            kwargs[key] = value
    else:
        kwargs = {} if cond is None else {"class_labels": cond}
    timestep = (t * timestep_scale).to(dtype)
    out = model(x.to(dtype), timestep=timestep, return_dict=False, **kwargs)[0]
    if out.shape != x.shape and out.shape[1] == 2 * x.shape[1]:  # a learned variance beside the output
        out = out[:, : x.shape[1]]
    return out


class DiffusersBlock(nn.Module):
    """One block (mode "independent"): a diffusers model holding a share of the layers."""

    def __init__(self, model: nn.Module, timestep_scale: float):
        super().__init__()
        self.model, self.timestep_scale = _no_label_dropout(model), float(timestep_scale)

    @contextlib.contextmanager
    def bound(self, shared: nn.Module | None = None):
        """The diffusers model this block runs as (its own)."""
        yield self.model

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond) -> torch.Tensor:
        return _run(self.model, x, c_noise, cond, self.timestep_scale)


class DiffusersLayers(nn.Module):
    """One block of mode "shared": its layers alone; the frozen embeddings and head (`frame`) are the
    task's, one copy for every block, and the block runs as that frame holding its layers."""

    def __init__(self, layers: nn.ModuleDict, timestep_scale: float):
        super().__init__()
        self.layers, self.timestep_scale = _no_label_dropout(layers), float(timestep_scale)

    @contextlib.contextmanager
    def bound(self, shared: nn.Module):
        """The shared frame holding this block's layers, for the `with`."""
        with _holding(shared, dict(self.layers.items())) as model:
            yield model

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond, shared: nn.Module) -> torch.Tensor:
        with self.bound(shared) as model:
            return _run(model, x, c_noise, cond, self.timestep_scale)


def transformer(
    path: str,
    subfolder: str | None = None,
    dtype: str = "float32",
    lora: dict | None = None,
    weights: str = "pretrained",
) -> Blocks:
    """A CustomTask model factory: the diffusers transformer saved at `path` (its folder, or a pipeline's
    folder with subfolder="transformer"), split into blocks (see the module docstring).

    dtype: the pretrained weights' dtype in the blocks: "float32", or with lora "bfloat16" (half the memory of
        the frozen base; the adapters and their AdamW state stay float32).
    lora: None trains every weight of a block; {"rank": r, "alpha": a, "targets": [...]} (all optional;
        alpha defaults to r, targets to DEFAULT_TARGETS) trains LoRA adapters only (add_lora): the frozen base
        weights have no optimizer state and are not in checkpoints (the pretrained folder gives them again).
    weights: "pretrained" (from_pretrained) or "random": the architecture of the folder's config.json,
        initialised by its class (seed 0), to train a diffusers architecture from scratch or to measure one.
    """
    if weights not in ("pretrained", "random"):
        raise ValueError(f"weights must be 'pretrained' or 'random', got {weights!r}")
    if not hasattr(torch, str(dtype)) or not isinstance(getattr(torch, str(dtype)), torch.dtype):
        raise ValueError(f"dtype must name a torch dtype such as 'float32' or 'bfloat16', got {dtype!r}")
    lora = dict(lora) if lora is not None else None
    if lora is not None and set(lora) - {"rank", "alpha", "targets"}:
        raise ValueError(f"lora takes rank, alpha and targets, got {sorted(lora)}")
    if lora is None and dtype != "float32":
        raise ValueError(
            f"full fine-tuning trains float32 weights (AdamW's flat state); dtype={dtype!r} is for the "
            f"frozen base of a LoRA run: give lora={{'rank': ...}} or dtype='float32'"
        )
    cls, config = model_config(path, subfolder)
    with torch.device("meta"):  # the layer lists, and DiT's label dropout, without memory
        skeleton = cls.from_config(config)
    num_layers = sum(len(lst) for _, lst in layer_lists(skeleton))
    labels = [m for m in skeleton.modules() if isinstance(m, LabelEmbedding)]
    dropout = labels[0].dropout_prob if labels else 0.0
    null_label = labels[0].num_classes if labels and dropout > 0 else None  # DiT's null class: the last row
    scale = TIMESTEP_SCALE.get(cls.__name__, 1000.0)
    path = str(Path(path).resolve())

    def base(cutter, layers: range | None = None) -> nn.Module:
        """cutter(the model): its sizes alone when the trainer sizes the blocks (meta device), else read."""
        if torch.get_default_device().type == "meta":
            return cutter(_skeleton(path, subfolder, str(dtype)))
        if weights == "random":
            return cutter(_pretrained(path, subfolder, str(dtype), weights))
        return _part(path, subfolder, str(dtype), cutter, layers)

    def make_block(index: int, layers: range) -> nn.Module:
        part = base(lambda m: split(m, layers), layers).requires_grad_(True)
        if lora is not None:
            add_lora(part, **lora, name=cls.__name__)
        return DiffusersBlock(part, scale)

    def make_part(index: int, layers: range) -> nn.Module:
        part = base(lambda m: cut(m, layers), layers).requires_grad_(True)
        if lora is not None:
            add_lora(part, **lora, name=cls.__name__)
        return DiffusersLayers(part, scale)

    return Blocks(
        make_block, num_layers, null_label=null_label, cond_dropout=dropout, processes=("flow",),
        shared=lambda: _no_label_dropout(base(frame)), make_part=make_part,
        name=f"{cls.__name__} at {path}",
    )  # fmt: skip


class PipelineTransformer(nn.Module):
    """A trained run (a BlockModel of `transformer` blocks) as the diffusers transformer it came from.

    Called with the transformer's own arguments (hidden_states, timestep, ...): the timestep picks the block
    (every row of a call must fall in one block, as pipelines call it), whose model runs the call.
    """

    def __init__(self, model):
        super().__init__()
        settings = model.task.settings
        cls, config = model_config(settings["path"], settings.get("subfolder"))
        self.run_model = model
        self.config = diffusers.configuration_utils.FrozenDict(config)
        self.timestep_scale = TIMESTEP_SCALE.get(cls.__name__, 1000.0)
        self._dtype = getattr(torch, settings.get("dtype", "float32"))

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.run_model.device

    def forward(self, hidden_states, *args, timestep=None, **kwargs):
        t = torch.as_tensor(timestep, dtype=torch.float64).flatten() / self.timestep_scale
        owners = self.run_model.schedule.block_of(t.cpu()).unique().tolist()
        if len(owners) != 1:
            raise ValueError(
                f"timesteps {t.tolist()} fall in blocks {owners}: call the transformer with timesteps of one "
                f"block at a time (pipelines give every row the same timestep)"
            )
        task = self.run_model.task
        with self.run_model.block(owners[0]) as block:
            shared = task._shared_parts(hidden_states.device)[0] if task.mode == "shared" else None
            with block.bound(shared) as model:
                return model(hidden_states, *args, timestep=timestep, **kwargs)


def export_lora(run, out) -> list[Path]:
    """Write each block's LoRA adapters of a finished `run` (trained with lora=...) in peft's format:
    out/block<b>/adapter_config.json and adapter_model.safetensors, named as in the whole pretrained model
    (block b's layers under their own indices in it), so that peft's inject_adapter_in_model and
    set_peft_model_state_dict load them into the pretrained model; `split` of that model to block b's layers
    then computes what block b computes. Adapters on modules outside the layers (the embeddings, the head)
    are block b's own. Returns the folders."""
    from peft import get_peft_model_state_dict

    from .. import load
    from ..checkpoint import atomic_save, atomic_write
    from ..model import layer_ranges

    model = load(run, device="cpu")
    if not model.task.settings.get("lora"):
        raise ValueError(f"{run} was not trained with LoRA adapters (no 'lora' in its model settings)")
    folders = []
    for b, (block, layers) in enumerate(zip(model.blocks, layer_ranges(model.layers))):
        lists = layer_lists(
            _skeleton(model.task.settings["path"], model.task.settings.get("subfolder"), "float32")
        )
        renames, start = {}, 0
        for name, lst in lists:
            mine = [i - start for i in layers if start <= i < start + len(lst)]
            renames.update({f"{name}.{local}.": f"{name}.{i}." for local, i in enumerate(mine)})
            start += len(lst)
        state = {}
        adapted = block.model if isinstance(block, DiffusersBlock) else block.layers
        for key, value in get_peft_model_state_dict(adapted).items():
            prefix = next((p for p in renames if key.startswith(p)), None)
            state[renames[prefix] + key[len(prefix) :] if prefix else key] = value.contiguous()
        folder = Path(out) / f"block{b}"
        folder.mkdir(parents=True, exist_ok=True)
        config = adapted.peft_config["default"].to_dict()
        text = json.dumps(config, indent=2, sort_keys=True, default=sorted)  # target_modules: a set
        atomic_write(folder / "adapter_config.json", text.encode())
        atomic_save(folder / "adapter_model.safetensors", state, metadata={"format": "pt"})
        folders.append(folder)
    return folders
