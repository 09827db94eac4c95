"""``python -m deltatl.bench``: the same as ``deltatl bench``."""
import sys

from . import main

sys.exit(main())
