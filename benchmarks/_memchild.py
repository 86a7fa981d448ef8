"""Entry point of a CPU peak-memory subprocess: ``python -m benchmarks._memchild '<json spec>'``.

The spec names a registered op, an implementation and a case (``params``). The child measures one
step (see :func:`benchmarks.harness.measure_cpu_rss_here`) and prints ``MEMRESULT <json>``.
"""

from __future__ import annotations

import json
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    from . import get_op
    from .harness import measure_cpu_rss_here

    op = get_op(spec["op"])
    res = measure_cpu_rss_here(op, spec["impl"], spec["params"])
    print("MEMRESULT " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
