"""Release 0.1's home of PadimDetector, kept so that its pickles still load."""

from ._padim import PadimDetector

__all__ = ["PadimDetector"]
