"""The whole pipeline: catalog → embed → features → train → ensemble (stages already done are skipped).

Same as ``jungletrap run``: ``python jobs/pipeline.py --config conf/demo.yaml [--scheduler tcp://host:8786]``.
"""

from __future__ import annotations

import sys

from jungletrap.jobs._common import run_job

from jungletrap.config import STAGES


def main(argv: list[str] | None = None) -> int:
    return run_job(list(STAGES), argv, description=__doc__ or "")


if __name__ == "__main__":
    sys.exit(main())
