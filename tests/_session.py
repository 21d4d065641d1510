"""The pids of every process this test session started, and its own.

One set for the whole session: pytest imports tests/conftest.py as the
module "conftest" while the test files import it as "tests.conftest", two
module objects; both take the set from here, so the leak check at the end
of the session (conftest.no_leftover_segments) sees every process that
either of them spawned."""

import os

PIDS = {os.getpid()}
