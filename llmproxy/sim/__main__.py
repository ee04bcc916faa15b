"""``python -m llmproxy.sim``: run a simulated replica."""

import sys

from llmproxy.sim.cli import main

if __name__ == "__main__":
    sys.exit(main())
