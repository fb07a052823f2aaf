"""``python -m client.cli``: the same as ``psctl``."""
import sys

from client.cli import main

sys.exit(main())
