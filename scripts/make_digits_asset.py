"""Write the shipped digits array, ``diffusion_gym/assets/digits/digits.npz``, from scikit-learn.

The embedded offline world (:mod:`diffusion_gym.digits`) reads the 1,797 8×8 hand-written digits
of :func:`sklearn.datasets.load_digits` (a copy of the test set of the UCI ML optdigits data) from
this small array instead of importing scikit-learn at run time. The array was made once with this
script; rerun it only to check or rebuild it. It needs scikit-learn, which the package does not
depend on::

    pip install scikit-learn
    python scripts/make_digits_asset.py            # writes the array
    python scripts/make_digits_asset.py --check    # compares the shipped array with scikit-learn's

The archive holds two arrays, with no pickled objects:

* ``images``: ``(1797, 8, 8)`` uint8, the pixel counts 0–16 exactly as ``load_digits().images``
  (stored there as float64; every value is a whole number, checked below);
* ``labels``: ``(1797,)`` uint8, the digits 0–9 of ``load_digits().target``.

The licence and provenance of the data are in ``diffusion_gym/assets/digits/README.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

ASSET = Path(__file__).resolve().parents[1] / "diffusion_gym" / "assets" / "digits" / "digits.npz"


def digits_from_sklearn() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(images uint8 (1797, 8, 8), labels uint8 (1797,))``, checked to be lossless."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise SystemExit("this script needs scikit-learn: pip install scikit-learn") from error
    data = load_digits()
    images, labels = np.asarray(data.images), np.asarray(data.target)
    if images.shape != (1797, 8, 8) or labels.shape != (1797,):
        raise SystemExit(f"unexpected digits shapes {images.shape} and {labels.shape}; expected (1797, 8, 8), (1797,)")
    images_u8, labels_u8 = images.astype(np.uint8), labels.astype(np.uint8)
    if not (np.array_equal(images_u8, images) and np.array_equal(labels_u8, labels)):
        raise SystemExit("scikit-learn's digits are not whole numbers in 0..255: uint8 would change them")
    return images_u8, labels_u8


def digest(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 of the two arrays' bytes (C order), as the tests pin it."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    """Write (or, with ``--check``, compare) the shipped digits array."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare the shipped array with scikit-learn's")
    args = parser.parse_args(argv)
    images, labels = digits_from_sklearn()
    if args.check:
        with np.load(ASSET, allow_pickle=False) as shipped:
            same = np.array_equal(shipped["images"], images) and np.array_equal(shipped["labels"], labels)
        print(f"{ASSET}: {'identical to' if same else 'DIFFERS from'} scikit-learn's digits")
        return 0 if same else 1
    ASSET.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(ASSET, images=images, labels=labels)
    print(f"wrote {ASSET} ({ASSET.stat().st_size} bytes), sha256 of the arrays {digest(images, labels)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
