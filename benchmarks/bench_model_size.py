"""Size of a saved PadimDetector (joblib) and what it is made of.

Fits on a few random 224x224 images (file size does not depend on the pixel
values) for the default backbone and for resnet18 with n_features=100, dumps
with joblib, and prints the file size next to its parts: the truncated
backbone, the per-position means, and the lower-triangular whitening
factors, stored packed. For comparison it prints what a full (unpacked)
float32 factor and the float64 covariances kept by other implementations
would take.
"""

import argparse
import os
import tempfile

import joblib
import numpy as np

from skpadim import PadimDetector

MIB = 2**20


def measure(name, params, images):
    det = PadimDetector(image_size=224, random_state=0, device="cpu", **params).fit(
        images
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "padim.joblib")
        joblib.dump(det, path)
        size = os.path.getsize(path)
    gaussian, extractor = det.gaussian_, det.feature_extractor_
    n_positions, d = gaussian.location_.shape
    backbone = sum(v.nbytes for v in extractor.backbone_state_.values())
    packed = n_positions * d * (d + 1) // 2 * 4
    print(f"\n{name}: {n_positions} positions x {d} features")
    print(f"  joblib file              {size / MIB:8.1f} MiB")
    print(f"  - truncated backbone     {backbone / MIB:8.1f} MiB")
    print(f"  - means (float32)        {gaussian.location_.nbytes / MIB:8.1f} MiB")
    print(f"  - packed factors (f32)   {packed / MIB:8.1f} MiB")
    full32 = n_positions * d * d * 4
    print(
        f"  full float32 factors would be {full32 / MIB:.1f} MiB;"
        f" float64 covariances {2 * full32 / MIB:.1f} MiB"
    )
    return size


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=8)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.n_images, 224, 224, 3), dtype=np.uint8)
    measure("efficientnet_lite0 (default, n_features=100)", {}, images)
    measure(
        "resnet18, n_features=100",
        {"backbone": "resnet18", "weights": None, "n_features": 100},
        images,
    )


if __name__ == "__main__":
    main()
