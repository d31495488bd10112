"""``python -m bench`` (``make bench``): every benchmark in one go, each printing its table.

The embed benchmark makes its own clips; the feature and XGBoost benchmarks use a finished run's feature
table (``--run-dir``, default ``runs/demo``: run ``make demo`` first). Results are merged into
``bench/results.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import embed, features, xgb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    args = parser.parse_args()
    embed.main([])
    if (args.run_dir / "features").is_dir():
        features.main(["--run-dir", str(args.run_dir)])
        xgb.main(["--run-dir", str(args.run_dir)])
    else:
        print(f"\n{args.run_dir} has no feature table: run `make demo` for the feature and XGBoost benchmarks")


if __name__ == "__main__":
    main()
