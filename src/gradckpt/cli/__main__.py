"""``python -m gradckpt.cli``."""

import sys

from . import main

sys.exit(main())
