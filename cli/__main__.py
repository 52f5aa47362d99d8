"""``python -m cli``: the ``fedmtl`` command."""

from cli import main

main()
