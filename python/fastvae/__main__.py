"""``python -m fastvae``: the command line."""

from .cli import main

raise SystemExit(main())
