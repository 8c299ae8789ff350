"""`python -m kd_core`: the command line (see kd_core.cli)."""

from kd_core.cli import main

raise SystemExit(main())
