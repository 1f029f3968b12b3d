"""`python -m chargpt ...` (and `torchrun -m chargpt train ...`)."""

import sys

from chargpt.cli import main

sys.exit(main())
