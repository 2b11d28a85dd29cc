"""``python -m demo``: run the simulated node (see :mod:`demo.node`)."""

import sys

from demo.node import main

sys.exit(main())
