"""`python -m fae ...` is the `fae` command."""
from fae.cli import main

raise SystemExit(main())
