"""``python -m fastpo`` is the ``fastpo`` command."""

import sys

from fastpo.cli import main

sys.exit(main())
