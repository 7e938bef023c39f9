"""`python -m lcsm_compile.cli`: the same as the `lcsm-compile` console script."""
import sys

from . import main

sys.exit(main())
