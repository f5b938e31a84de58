"""``python -m kappa.cli``: the ``kappa`` command (``kappa up`` runs in its own process so)."""

import sys

from kappa.cli import main

sys.exit(main())
