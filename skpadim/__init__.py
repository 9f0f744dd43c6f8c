"""skpadim: PaDiM anomaly detection and localization for scikit-learn.

The estimators live in private modules and are re-exported here.
"""

from ._detector import PadimDetector
from ._features import PatchFeatureExtractor
from ._gaussian import PatchGaussian, PatchMoments

__version__ = "0.1.0.dev0"

__all__ = [
    "PadimDetector",
    "PatchFeatureExtractor",
    "PatchGaussian",
    "PatchMoments",
    "__version__",
]
