"""``python -m gradnoise`` is the ``gradnoise`` command."""
import sys

from .cli import main

sys.exit(main())
