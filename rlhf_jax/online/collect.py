"""Label collection for the online loop (spec §5.3): incremental reads of one run's labels from
the label store, and waiting for them with a progress line.

The store returns labels in id order and never a label whose smaller ids could still commit
(`LabelStore.labels_after`), so reading again after the last id seen never misses or repeats a
label. Only this run's comparisons count (their keys start with the run id): one store may
serve several runs of the same task. A resumed run reads from 0 again: the store, not the
trainer, is the record of what was answered, so nothing is counted twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

PAGE = 1000


class LabelCollector:
    """This run's labels, read incrementally from a store adapter (`online.store`)."""

    def __init__(self, store, run_id: str):
        """Args:
            store: a `DirectStore` or `HttpStore`.
            run_id: the run's id; its comparison keys start with f"{run_id}/".
        """
        self.store, self.prefix = store, f"{run_id}/"
        self.rows: list[dict] = []
        self.after = 0

    def read(self) -> int:
        """Reads every label that arrived since the last read; returns how many were new."""
        before = len(self.rows)
        while True:
            rows, nxt = self.store.labels_after(self.after, PAGE)
            self.rows.extend(r for r in rows if r["key"].startswith(self.prefix))
            self.after = nxt
            if len(rows) < PAGE:
                return len(self.rows) - before

    def wait_for(self, need: int, poll_s: float, *, stop: Callable[[], bool] = lambda: False,
                 show_every_s: float = 5.0,
                 sync: Callable[[int, bool], tuple[int, bool]] = lambda n, s: (n, s)) -> bool:
        """Polls until this run has `need` labels, logging "waiting for labels: 37/64, 1.2
        labels/s" every `show_every_s` seconds.

        Args:
            need: the label count to reach.
            poll_s: seconds between reads.
            stop: True stops the wait (a stop signal).
            show_every_s: seconds between progress lines.
            sync: (count, stop) -> (count, stop) as every process should see them (a
                broadcast from process 0 in multi-host runs).

        Returns:
            True when the labels are there, False when stopped first.
        """
        t0 = time.monotonic()
        have0, shown = len(self.rows), -1e9
        while True:
            have, stopped = sync(len(self.rows), bool(stop()))
            if have >= need:
                return True
            if stopped:
                return False
            now = time.monotonic()
            if now - shown >= show_every_s:
                rate = (have - have0) / max(now - t0, 1e-9)
                logger.info("waiting for labels: %d/%d, %.1f labels/s", have, need, rate)
                shown = now
            time.sleep(poll_s)
            if self.store is not None:
                self.read()
