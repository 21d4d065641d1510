"""The tools that ship with shmgrpc, apart from the runtime a message goes
through. Each imports the runtime (the public API and, where it inspects or
measures the internals, their modules); nothing of the runtime imports a tool.

    python -m shmgrpc ...                 shmgrpc.tools.cli: doctor, ls, gc (also the `shmgrpc` command)
    python -m shmgrpc.tools.bench         shmgrpc.tools.bench: shmgrpc against plain gRPC, every transport and API
                                          (its server process: shmgrpc.tools._bench_server)
    python -m shmgrpc.tools.loopstall     shmgrpc.tools.loopstall: how long a large message holds an event loop

Their tables, and the demo client's, come from one printer: format_table.
"""

from ._table import format_table

__all__ = ["format_table"]
