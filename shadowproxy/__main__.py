"""`python -m shadowproxy` runs the command line."""

from shadowproxy.cli import main

raise SystemExit(main())
