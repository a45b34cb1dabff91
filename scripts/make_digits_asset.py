"""Write ``fedpeft_pl/assets/digits.npz``: scikit-learn's 8x8 digits as ``load_digits()`` gives them.

``fedpeft_pl.data.Digits`` reads this file, so the default install needs no scikit-learn (and with it no SciPy,
which torchmetrics imports at every start wherever it is installed). The images are kept as their 17 grey levels
(0..16, uint8) and the labels as uint8; ``tests/test_data.py`` holds the file equal to ``load_digits()``.
The data: the test set of the UCI "Optical Recognition of Handwritten Digits" data set (E. Alpaydin and
C. Kaynak, 1998; CC BY 4.0), as scikit-learn ships it.

    pip install scikit-learn && python scripts/make_digits_asset.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

OUTPUT = Path(__file__).resolve().parents[1] / "fedpeft_pl" / "assets" / "digits.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    digits = load_digits()
    if not np.array_equal(digits.images, np.round(digits.images)) or digits.images.max() > 16:
        raise SystemExit("load_digits() no longer gives grey levels 0..16; the asset's format needs revisiting")
    np.savez_compressed(args.output, images=digits.images.astype(np.uint8), targets=digits.target.astype(np.uint8))
    print(f"wrote {args.output}: {len(digits.target)} images")


if __name__ == "__main__":
    main()
