"""`python -m flows.cli` = `nds`."""

import sys

from flows.cli import main

sys.exit(main())
