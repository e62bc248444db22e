"""`python -m diffrl ...` is the `diffrl` command."""

import sys

from diffrl.cli import main

sys.exit(main())
