"""Catalog stage: competition CSVs + videos root -> catalog.parquet with folds and partitions.

Same as ``jungletrap catalog``: ``python jobs/catalog.py --config conf/demo.yaml [--scheduler tcp://host:8786]``.
"""

from __future__ import annotations

import sys

from jungletrap.jobs._common import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job(["catalog"], argv, description=__doc__ or "")


if __name__ == "__main__":
    sys.exit(main())
