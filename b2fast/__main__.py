"""``python -m b2fast`` is ``python -m b2fast.train``."""
import sys

from b2fast.train import main

sys.exit(main())
