"""``python -m hf_backdoor.cli``: the same as the ``hf-backdoor`` command."""

import sys

from . import main

sys.exit(main())
