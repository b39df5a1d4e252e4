"""Thin wrapper: see `cdv2.cli.convert` (also `cdv2 convert`)."""
import sys

from cdv2.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
