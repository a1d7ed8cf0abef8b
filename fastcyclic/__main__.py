"""``python -m fastcyclic``: the ``fastcyclic`` command."""
import sys

from fastcyclic.cli import main

sys.exit(main())
