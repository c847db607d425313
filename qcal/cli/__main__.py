"""`python -m qcal.cli`: the same command line as the `qcal` script."""
import sys

from qcal.cli import main

sys.exit(main())
