"""``python -m beit`` (and ``torchrun -m beit``)."""

import sys

from .cli import main

sys.exit(main())
