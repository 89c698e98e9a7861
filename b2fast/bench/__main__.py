"""``python -m b2fast.bench``: see :mod:`b2fast.bench.cli`."""
import sys

from b2fast.bench.cli import main

sys.exit(main())
