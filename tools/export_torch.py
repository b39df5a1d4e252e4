"""Thin wrapper: see `cdv2.weights.export_cli` (also `cdv2 export`)."""
import sys

from cdv2.weights.export_cli import main

if __name__ == "__main__":
    sys.exit(main())
