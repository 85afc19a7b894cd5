"""`python -m fae.cli ...` (e.g. under torchrun) is the `fae` command."""
import sys

from fae.cli import main

sys.exit(main())
