"""``python -m tritskip``: the same command line as the ``tritskip`` script."""

from .cli import main

raise SystemExit(main())
