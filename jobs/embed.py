"""Embed stage: decode + sample frames, run the backbone per worker -> embeddings/<backbone>/part-*.parquet.

Same as ``jungletrap embed``: ``python jobs/embed.py --config conf/demo.yaml [--scheduler tcp://host:8786]``.
"""

from __future__ import annotations

import sys

from jungletrap.jobs._common import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job(["embed"], argv, description=__doc__ or "")


if __name__ == "__main__":
    sys.exit(main())
