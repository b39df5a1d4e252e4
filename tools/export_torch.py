"""Thin wrapper: see `cdv2.cli.export` (also `cdv2 export`)."""
import sys

from cdv2.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
