"""Run by tests/test_trainer.py under torchrun: a short run, then each rank writes a checksum of its
(full) policy weights (DDP and FSDP keep them identical) and the prompts it drew."""

import json
import os
import sys

import torch

from fastpo.trainer.cli import parse_config
from fastpo.trainer.loop import Trainer


def main():
    out = sys.argv[1]
    cfg = parse_config(sys.argv[2:])
    trainer = Trainer(cfg)
    rank = trainer.dist.rank
    seen = []
    sample = trainer.prompts.sample
    trainer.prompts.sample = lambda n, rng: seen.extend(x := sample(n, rng)) or x
    trainer.train()
    from fastpo.trainer.checkpoint import gather_state

    weights = gather_state(trainer.trainable_modules)["policy"]  # full weights, also under FSDP
    trainer.close()
    checksum = float(sum(v.double().sum() for v in weights.values()))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"checksum": checksum, "prompts": [e.prompt for e in seen],
                   "world": int(os.environ["WORLD_SIZE"])}, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
