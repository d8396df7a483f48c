"""`python -m qwenkit ...` runs the `qwenkit` command."""

from .cli import main

raise SystemExit(main())
