"""`python -m chargpt ...` (and `torchrun -m chargpt train ...`)."""

import sys

try:
    from chargpt.cli import main
except KeyboardInterrupt:  # Ctrl-C while Python is still starting chargpt
    sys.exit(130)

sys.exit(main())
