"""The ``fastpo`` command: ``fastpo bench ...`` (the benchmark suite) and ``fastpo train ...``
(the bundled trainer). Each subcommand owns its flags; ``fastpo <command> --help`` lists them."""

from __future__ import annotations

import sys
from typing import List, Optional

USAGE = """usage: fastpo <command> [options]

commands:
  train    run the bundled RL / preference trainer (GRPO by default on a built-in task)
  bench    run the benchmark suite against eager PyTorch, torch.compile and installed peers

`fastpo <command> --help` shows each command's options."""


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a command is required: usage on stderr, status 2 (as argparse does)
        print(f"{USAGE}\n\nfastpo: error: no command given", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from benchmarks.__main__ import main as bench_main

        return bench_main(rest)
    if command == "train":
        from fastpo.trainer.cli import main as train_main

        return train_main(rest)
    print(f"fastpo: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
