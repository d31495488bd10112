"""Per-partition stage tasks: read each result once, then let the cluster forget it.

A client that keeps every future of a stage until the end makes the scheduler keep every finished task's
result too, so a worker that dies late in the stage takes the results of all the tasks it ever ran with it,
and the scheduler runs them again (an embed partition is minutes of GPU time). Releasing each future as soon as
its result is read leaves the scheduler nothing to recompute but the tasks in flight; the tasks themselves are
idempotent (a part already whole is returned, not rewritten), so even those cost little.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from distributed import Client, Future, as_completed

__all__ = ["results_as_completed"]


def results_as_completed(client: Client, futures: Iterable[Future], *, with_keys: bool = False) -> Iterator[Any]:
    """Yield each future's result in completion order (``(key, result)`` with ``with_keys``), releasing the
    future once its result is read.

    If the caller stops early (an exception in its loop, Ctrl-C, :meth:`close`), the futures not yet read are
    cancelled, so that queued partitions do not go on running after the stage stopped.
    """
    inflight: dict[str, Future] = {f.key: f for f in futures}
    try:
        for future in as_completed(list(inflight.values())):
            result = future.result()
            key = future.key
            del inflight[key]
            future.release()
            yield (key, result) if with_keys else result
    except BaseException:
        client.cancel(list(inflight.values()))
        raise
