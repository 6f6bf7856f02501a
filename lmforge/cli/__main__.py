"""`python -m lmforge.cli ...` and `torchrun ... -m lmforge.cli ...`."""

import sys

from lmforge.cli import main

sys.exit(main())
