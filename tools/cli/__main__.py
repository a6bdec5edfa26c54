"""``python -m aligncodec.tools.cli``: the same as the ``aligncodec`` command."""

import sys

from aligncodec.tools.cli import main

sys.exit(main())
