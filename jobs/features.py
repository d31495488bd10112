"""Features stage: container, pixel/motion and pooled-embedding features -> features/part-*.parquet.

Same as ``jungletrap features``: ``python jobs/features.py --config conf/demo.yaml [--scheduler tcp://host:8786]``.
"""

from __future__ import annotations

import sys

from jungletrap.jobs._common import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job(["features"], argv, description=__doc__ or "")


if __name__ == "__main__":
    sys.exit(main())
