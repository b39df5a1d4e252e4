"""`python -m cdv2.train`: see `cdv2.cli.train`."""
import sys

from cdv2.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
