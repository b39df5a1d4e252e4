"""`python -m cdv2.eval`: see `cdv2.cli.eval`."""
import sys

from cdv2.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
