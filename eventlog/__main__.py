"""Run the command line as ``python -m eventlog``, the same as the ``eventlog`` script."""

from .cli import main

raise SystemExit(main())
