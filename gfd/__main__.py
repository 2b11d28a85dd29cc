"""``python -m gfd``: the same as the ``gpu-feature-discovery`` console script."""

import sys

from gfd.main import main

sys.exit(main())
