"""``python -m aligncodec.tools.cli``: the same as the ``aligncodec`` command."""

from aligncodec.__main__ import run  # installs the Ctrl-C handler first

run()
