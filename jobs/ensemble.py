"""Ensemble stage: blend on out-of-fold predictions -> submission.csv, metrics.json, report.html.

Same as ``jungletrap ensemble``: ``python jobs/ensemble.py --config conf/demo.yaml [--scheduler tcp://host:8786]``.
"""

from __future__ import annotations

import sys

from jungletrap.jobs._common import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job(["ensemble"], argv, description=__doc__ or "")


if __name__ == "__main__":
    sys.exit(main())
