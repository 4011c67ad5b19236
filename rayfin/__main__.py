"""``python -m rayfin`` is the ``rayfin`` command."""

from rayfin.cli import main

main()
