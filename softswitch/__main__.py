"""`python -m softswitch` is the `softswitch` command."""

import sys

from .cli import main

sys.exit(main())
