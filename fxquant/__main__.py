"""``python -m fxquant``: the ``fxquant`` command."""

import sys

from fxquant.cli import main

sys.exit(main())
