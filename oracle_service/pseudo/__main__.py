"""``python -m oracle_service.pseudo generate --out DIR``: see :mod:`oracle_service.pseudo`."""

import sys

from .generate import main

sys.exit(main())
