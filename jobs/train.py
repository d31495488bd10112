"""Train stage: xgboost.dask and the neural head over the folds -> oof/, test/, models/.

Same as ``jungletrap train``: ``python jobs/train.py --config conf/demo.yaml [--scheduler tcp://host:8786]``.
"""

from __future__ import annotations

import sys

from jungletrap.jobs._common import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job(["train"], argv, description=__doc__ or "")


if __name__ == "__main__":
    sys.exit(main())
