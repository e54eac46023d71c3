"""``python -m fs_gmfl`` is the ``fs-gmfl`` command."""

import sys

from fs_gmfl.cli import main

sys.exit(main())
