"""``python -m fs_gmfl.hosts.fs.run --cfg FILE [KEY VALUE ...]``: FederatedScope's unmodified main, with fs_gmfl.

Registers fs_gmfl in FederatedScope, then runs ``federatedscope.main`` as
``__main__``; FederatedScope parses the arguments itself (``--cfg``,
``--client_cfg``, overrides). fs_gmfl configuration errors print one line and
exit with code 2, as in ``fs-gmfl run``.
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Sequence

from fs_gmfl.errors import FsGmflError

EXIT_USAGE = 2
MISSING_FS = ("FederatedScope is not installed; install its 'llm' branch: git clone -b llm "
              "https://github.com/alibaba/FederatedScope && pip install --no-deps -e FederatedScope "
              "(see README, 'FederatedScope host')")


def run_module(module: str, argv: Sequence[str]) -> int:
    """Register fs_gmfl, then run ``module`` as ``__main__`` with ``argv``; returns the exit code."""
    from fs_gmfl.hosts.fs import fs_available

    if not fs_available():
        print(f"fs-gmfl: error: {MISSING_FS}", file=sys.stderr)
        return EXIT_USAGE
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fs_gmfl.hosts.fs import register_all

    saved = sys.argv
    sys.argv = [module, *argv]
    try:
        register_all()
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except FsGmflError as err:
        print(f"fs-gmfl: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run FederatedScope's main with fs_gmfl registered."""
    return run_module("federatedscope.main", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
