"""skpadim: visual anomaly detection and localization for scikit-learn.

PaDiM and its family (PatchCore, SPADE, Gaussian AD, CFLOW-AD) on one image
pipeline. The estimators live in private modules and are re-exported here,
imported on first use (PEP 562), so that ``import skpadim`` and the command
line start without loading torch.
"""

import importlib

__version__ = "0.2.0.dev0"

# Public name -> the private module that defines it.
_EXPORTS = {
    "CflowDetector": "._cflow",
    "GaussianADDetector": "._gaussian_ad",
    "PadimDetector": "._padim",
    "PatchCoreDetector": "._patchcore",
    "PatchFeatureExtractor": "._features",
    "PatchGaussian": "._gaussian",
    "PatchMemoryBank": "._memory_bank",
    "PatchMoments": "._moments",
    "SpadeDetector": "._spade",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'skpadim' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])
