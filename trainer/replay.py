"""`python -m trainer.replay BUNDLE`, the command each bundle's README.txt names: divergence/replay.py."""

import sys

from trainer.divergence.replay import main

if __name__ == "__main__":
    sys.exit(main())
