"""Worker-side batching for taskiq, typed end to end.

>>> @batch_task(broker, batch_size=100, batch_timeout=2.0)
... async def save(rows: list[Row], table: str) -> None: ...
>>> await save.kiq(row, "events")  # one item per kiq

The worker calls ``save`` once per group of up to 100 rows that share the same
extra arguments, at the latest 2 seconds after the group's first row.
"""

from batchtask._batcher import FlushReason
from batchtask._config import BatchConfig, BatchSettings, ResultsMode
from batchtask._context import BatchContext
from batchtask._errors import (
    BatchArgumentError,
    BatchCallError,
    BatchConfigError,
    BatchResultError,
    BatchTaskError,
    CallTimeoutError,
    ItemExpiredError,
    ItemValidationError,
    MessageTooLargeError,
    PartialFailure,
    PoisonItemError,
    Retry,
)
from batchtask._lifecycle import flush_all
from batchtask._retries import DeadLetter
from batchtask._task import BatchKicker, BatchTask, batch_task
from batchtask.worker import BatchReceiver

__version__ = "0.2.0"
"""The one source of the version: pyproject.toml and the docs read it."""

__all__ = [
    "BatchArgumentError",
    "BatchCallError",
    "BatchConfig",
    "BatchConfigError",
    "BatchContext",
    "BatchKicker",
    "BatchReceiver",
    "BatchResultError",
    "BatchSettings",
    "BatchTask",
    "BatchTaskError",
    "CallTimeoutError",
    "DeadLetter",
    "FlushReason",
    "ItemExpiredError",
    "ItemValidationError",
    "MessageTooLargeError",
    "PartialFailure",
    "PoisonItemError",
    "ResultsMode",
    "Retry",
    "__version__",
    "batch_task",
    "flush_all",
]
