"""``python -m fs_gmfl.hosts.fs.run --cfg FILE [KEY VALUE ...]``: FederatedScope's unmodified main, with fs_gmfl.

Registers fs_gmfl in FederatedScope, then runs ``federatedscope.main`` as
``__main__``; FederatedScope parses the arguments itself (``--cfg``,
``--client_cfg``, overrides). fs_gmfl configuration errors print one line and
exit with code 2, as in ``fs-gmfl run``.
"""

from __future__ import annotations

import importlib
import os
import runpy
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from fs_gmfl.errors import FsGmflError

EXIT_USAGE = 2
#: exit status of a run that aggregated rounds but never accepted a client update.
EXIT_NOTHING_ACCEPTED = 1
#: exit status of a distributed participant that stopped at a deadline (``fault_tolerance.*``).
EXIT_STOPPED = 1
MISSING_FS = ("FederatedScope is not installed; install its 'llm' branch: git clone -b llm "
              "https://github.com/alibaba/FederatedScope && pip install --no-deps -e FederatedScope "
              "(see docs/federatedscope.md)")


def run_module(module: str, argv: Sequence[str], patch: Callable[[ModuleType], None] | None = None) -> int:
    """Register fs_gmfl, then run ``module`` as ``__main__`` with ``argv``; returns the exit code.

    With ``patch``, the module is imported instead, ``patch(module)`` adjusts it
    (e.g. replaces a function its ``main`` calls) and its ``main()`` runs.
    """
    from fs_gmfl.hosts.fs import fs_available

    if not fs_available():
        print(f"fs-gmfl: error: {MISSING_FS}", file=sys.stderr)
        return EXIT_USAGE
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fs_gmfl.hosts.fs import register_all

    from fs_gmfl.hosts.fs.config import command_line, set_command_line
    from fs_gmfl.hosts.fs.workers import CLIENTS, SERVERS

    saved = sys.argv
    sys.argv = [module, *argv]
    SERVERS.clear()
    CLIENTS.clear()
    try:
        register_all()
        set_command_line(*command_line(argv))
        if patch is None:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            loaded = importlib.import_module(module)
            patch(loaded)
            loaded.main()
    except FsGmflError as err:
        print(f"fs-gmfl: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = saved
        set_command_line(None, None)
    return _outcome(SERVERS, CLIENTS)


def _outcome(servers: Sequence[object], clients: Sequence[object] = ()) -> int:
    """0; :data:`EXIT_STOPPED` (one line on stderr) if a distributed server or client stopped at a deadline; or
    :data:`EXIT_NOTHING_ACCEPTED` (one line) if a server never accepted an update."""
    for worker in [*servers, *clients]:
        if getattr(worker, "failure", None):
            role = "server" if worker in servers else f"client #{getattr(worker, 'ID', '?')}"
            print(f"fs-gmfl: error: {role}: {worker.failure}", file=sys.stderr)
            return EXIT_STOPPED
    for server in servers:
        if getattr(server, "never_accepted", False):
            print(f"fs-gmfl: error: no client update was accepted in {len(server.rounds)} aggregated round(s) "
                  f"({sum(server.rejections.values())} rejected); the global model never moved (see the warnings "
                  "and summary.json)", file=sys.stderr)
            return EXIT_NOTHING_ACCEPTED
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run FederatedScope's main with fs_gmfl registered."""
    return run_module("federatedscope.main", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
