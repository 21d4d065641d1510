"""python -m shmgrpc doctor | ls | gc (see shmgrpc.tools.cli)."""

import sys

from .tools.cli import main

sys.exit(main())
