"""taskiq's ``InMemoryBroker``: messages handled in the process that kicks them.

- Its result backend keeps 100 results by default, fewer than one batch may
  store at once: the cap is lifted while it is taskiq's default (`registered`).
- ``InMemoryBroker(await_inplace=True)`` handles a message before its kick
  returns (`runs_in_place`); ``flush_all`` waits for every message kicked
  (``wait_all``).

The broker and its subclasses.
"""

import logging
from typing import Any, ClassVar

from batchtask.brokers._base import PerMessage

logger = logging.getLogger("batchtask")


TASKIQ_DEFAULT_STORED_RESULTS = 100
"""``InMemoryBroker(max_stored_results=...)``'s default."""


class InMemory(PerMessage):
    """taskiq's ``InMemoryBroker`` (see the module)."""

    family: ClassVar[str] = "in-memory"

    def registered(self) -> None:
        """Lift the default cap of 100 stored results.

        A batch stores up to `batch_size` results at once, so taskiq's default
        in-memory cap evicts results before anyone reads them. The cap is
        lifted only while it is taskiq's default (100); any other value is kept.
        """
        backend: Any = self.broker.result_backend
        if getattr(backend, "max_stored_results", None) != (
            TASKIQ_DEFAULT_STORED_RESULTS
        ):
            return
        backend.max_stored_results = -1
        logger.info(
            "batchtask: InMemoryBroker result cap lifted (taskiq's default of "
            "%d stored results would evict batch results before they are read); "
            "pass InMemoryBroker(max_stored_results=N) with N != 100 to keep a cap",
            TASKIQ_DEFAULT_STORED_RESULTS,
        )

    def runs_in_place(self) -> bool:
        """``InMemoryBroker(await_inplace=True)``."""
        return bool(getattr(self.broker, "await_inplace", False))

    async def wait_kicked(self) -> None:
        """``InMemoryBroker.wait_all()``."""
        broker: Any = self.broker
        await broker.wait_all()
