"""``python -m kvcache.cli``: the ``kvcache`` command."""

import sys

from . import main

sys.exit(main())
