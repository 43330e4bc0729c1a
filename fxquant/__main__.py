"""``python -m fxquant``: the ``fxquant`` command."""

import sys

from fxquant.cli.main import main

sys.exit(main())
