"""`python -m tetherfed.worker …`: the same as `tetherfed worker …`."""

import sys

from . import main

sys.exit(main())
