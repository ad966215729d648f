"""``python -m memcore ...`` is the ``memcore`` command."""

import sys

from memcore.cli import main

sys.exit(main())
