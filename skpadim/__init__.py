"""skpadim: visual anomaly detection and localization for scikit-learn.

PaDiM and its family (PatchCore, SPADE, Gaussian AD, CFLOW-AD) on one image
pipeline. The estimators live in private modules and are re-exported here.
"""

from ._cflow import CflowDetector
from ._features import PatchFeatureExtractor
from ._gaussian import PatchGaussian
from ._gaussian_ad import GaussianADDetector
from ._memory_bank import PatchMemoryBank
from ._moments import PatchMoments
from ._padim import PadimDetector
from ._patchcore import PatchCoreDetector
from ._spade import SpadeDetector

__version__ = "0.2.0.dev0"

__all__ = [
    "CflowDetector",
    "GaussianADDetector",
    "PadimDetector",
    "PatchCoreDetector",
    "PatchMemoryBank",
    "PatchFeatureExtractor",
    "PatchGaussian",
    "PatchMoments",
    "SpadeDetector",
    "__version__",
]
