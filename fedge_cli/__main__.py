"""``python -m fedge_cli``: the ``fedge`` command."""

import sys

from fedge_cli.main import main

sys.exit(main())
