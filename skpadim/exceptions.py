"""Warnings and errors raised by skpadim (public, like ``sklearn.exceptions``)."""


class SkpadimVersionWarning(UserWarning):
    """A model saved by another skpadim version was loaded."""


class WorkerLostError(RuntimeError):
    """A Dask worker was lost and a chunk of images could not be computed.

    Raised by a fit or a scoring method under
    ``joblib.parallel_config(backend="dask")`` when a chunk's task failed
    because its worker died (or the cluster was left without workers) more
    often than the retries allow. A detector being fitted is left as it was.
    """


__all__ = ["SkpadimVersionWarning", "WorkerLostError"]
