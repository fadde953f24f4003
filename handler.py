"""The RunPod Hub's entry point: the worker is `python -m listener` (the Dockerfile's CMD); this file runs the
same, for tools that look for a root `handler.py` (the Hub's publishing check, `python handler.py --test_input`)."""

import sys

from listener.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
