"""One training process of the distributed tests: `python -m tests.distworker SPEC_JSON`.

The tests start W of these with torchrun's environment variables (RANK, WORLD_SIZE, MASTER_ADDR, ...), or
one with none of them for the single-process reference, so both sides run the same code with one thread.
SPEC_JSON holds TrainConfig fields plus: num_layers, resume, dump (a folder for each rank's block tensors and
byte counts) and kill_at ([rank, block step]: that rank SIGKILLs itself after that step, to test a death).
"""

import json
import os
import signal
import sys

import torch


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    from safetensors.torch import save_file

    from dblocks_fast import TrainConfig, Trainer
    from dblocks_fast.data import load_digits
    from dblocks_fast.tasks import ImageGeneration

    data = load_digits("train")
    task = ImageGeneration.for_data(
        data, hidden=16, heads=2, num_layers=spec.pop("num_layers", 4), patch_size=4
    )
    kill_at, dump, resume = spec.pop("kill_at", None), spec.pop("dump", None), spec.pop("resume", False)
    base = dict(steps_per_block=6, batch_size=8, warmup=2, log_every=2, ckpt_every=0, progress=False)
    config = TrainConfig(**{**base, "device": "cpu", **spec})

    def callback(trainer, b):
        if kill_at and trainer.comm.rank == kill_at[0] and trainer.steps_done[b] == kill_at[1]:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer = Trainer(task, data, config, resume=resume, callback=callback)
    trainer.fit()
    if dump:
        rank = trainer.comm.rank
        state = {}
        for b in trainer.owned:
            for k, v in trainer.block_tensors(b).items():
                state[f"{b}/{k}"] = v.contiguous()
        os.makedirs(dump, exist_ok=True)
        save_file(state, os.path.join(dump, f"rank{rank}.safetensors"))
        with open(os.path.join(dump, f"rank{rank}.json"), "w") as f:
            json.dump({"sent": trainer.comm.sent, "blocks": trainer.owned, "steps": trainer.steps_done}, f)


if __name__ == "__main__":
    main()
