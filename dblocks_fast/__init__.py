"""dblocks_fast: DiffusionBlocks (Shing, Koyama, Akiba; ICLR 2026), block-wise training of transformers as
independent denoisers, with fused kernels and block paging.

    import dblocks_fast as dbf
    data = dbf.data.load_digits("train")
    task = dbf.tasks.ImageGeneration.for_data(data)
    model = dbf.train(task, data, dbf.TrainConfig(num_blocks=3, steps_per_block=1000, out_dir="runs/digits"))
    images = dbf.sample(model, labels=torch.arange(10), num_steps=30)
"""

__version__ = "0.1.0"

from . import data, ops, precond, tasks, testing  # noqa: E402
from .checkpoint import CheckpointError  # noqa: E402
from .custom import Blocks, CustomTask, Network  # noqa: E402
from .model import BlockModel  # noqa: E402
from .sample import load, sample  # noqa: E402
from .schedule import EDM, FlowMatching, Masking, NoiseProcess, NoiseSchedule  # noqa: E402
from .train import TrainConfig, Trainer, TrainingDiverged, train  # noqa: E402

__all__ = [
    "__version__",
    "BlockModel",
    "Blocks",
    "CustomTask",
    "Network",
    "CheckpointError",
    "EDM",
    "FlowMatching",
    "Masking",
    "NoiseProcess",
    "NoiseSchedule",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "data",
    "load",
    "ops",
    "precond",
    "sample",
    "tasks",
    "testing",
    "train",
]
