"""Run by tests/test_trainer.py under torchrun: a short GRPO run, then each rank writes a checksum
of its policy weights (DDP keeps them identical) and how many prompts it saw."""

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
    checksum = float(sum(p.detach().double().sum() for p in trainer.lm.parameters()))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"checksum": checksum, "prompts": [e.prompt for e in seen],
                   "world": int(os.environ["WORLD_SIZE"])}, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
