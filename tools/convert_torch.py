"""Thin wrapper: see `cdv2.weights.convert_cli` (also `cdv2 convert`)."""
import sys

from cdv2.weights.convert_cli import main

if __name__ == "__main__":
    sys.exit(main())
