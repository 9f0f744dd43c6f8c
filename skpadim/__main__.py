"""``python -m skpadim``: the same command line as ``skpadim``."""

from ._cli import main

if __name__ == "__main__":
    main()
