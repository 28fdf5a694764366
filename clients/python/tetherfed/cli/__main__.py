"""`python -m tetherfed.cli …`: the same as `tetherfed …`."""

import sys

from ._main import main

sys.exit(main())
