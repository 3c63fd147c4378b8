"""`python -m textgen ...`: the same as the `textgen` command."""

from .cli import main

raise SystemExit(main())
