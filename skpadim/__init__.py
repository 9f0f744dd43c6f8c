"""skpadim: visual anomaly detection and localization for scikit-learn.

PaDiM and its family (PatchCore, SPADE, Gaussian AD, CFLOW-AD) on one image
pipeline. The estimators live in private modules and are re-exported here.
"""

from ._features import PatchFeatureExtractor
from ._gaussian import PatchGaussian
from ._moments import PatchMoments
from ._padim import PadimDetector

__version__ = "0.2.0.dev0"

__all__ = [
    "PadimDetector",
    "PatchFeatureExtractor",
    "PatchGaussian",
    "PatchMoments",
    "__version__",
]
