"""The error codes the plugin reports under (each can be disabled on its own)."""

from mypy.errorcodes import ErrorCode

BATCH_CONFIG = ErrorCode(
    "batch-config",
    "A batch_task() setting that the runtime rejects",
    "batchtask",
)
BATCH_FUNCTION = ErrorCode(
    "batch-function",
    "A function that batch_task() cannot batch",
    "batchtask",
)
