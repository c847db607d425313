"""`python -m qcal.cli`: the same command line as the `qcal` script."""
import sys

from qcal.cli import main

# guarded: the worker processes of a local Dask cluster start by importing this module again
if __name__ == "__main__":
    sys.exit(main())
