"""Warnings and errors raised by skpadim (public, like ``sklearn.exceptions``)."""


class SkpadimVersionWarning(UserWarning):
    """A model saved by another skpadim version was loaded."""


__all__ = ["SkpadimVersionWarning"]
