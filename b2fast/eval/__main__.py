"""``python -m b2fast.eval``: see :mod:`b2fast.eval.cli`."""
import sys

from b2fast.eval.cli import main

sys.exit(main())
