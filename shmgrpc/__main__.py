"""python -m shmgrpc doctor | ls | gc (see shmgrpc.cli)."""

import sys

from .cli import main

sys.exit(main())
