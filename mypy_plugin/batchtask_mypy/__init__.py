"""mypy plugin for batchtask: what ``Concatenate`` overloads cannot say.

Enable it with ``plugins = ["batchtask_mypy"]`` (``pyproject.toml``, under
``[tool.mypy]``) or ``plugins = batchtask_mypy`` (``mypy.ini``). It changes
how mypy types ``batch_task(...)`` and the function it decorates:

- ``.kiq``, ``.kicker().kiq`` and ``schedule_by_*`` take the item under the
  function's own parameter name and kind (``save.kiq(rows=row)`` is accepted
  exactly when the runtime accepts it), then the extra parameters, without the
  ``TaskiqDepends`` parameters that taskiq injects on the worker;
- a function that cannot batch (no first parameter, a first parameter that is
  not a list, a method, an overloaded function) is reported at the decorator,
  naming the function, the parameter and the fix (code ``batch-function``);
- ``results="per_item"`` requires the function to return one result per item
  (an iterable that is not ``str``, ``bytes`` or a mapping) and types each
  item's result as exactly its element type (code ``batch-function``);
- literal settings the runtime would reject are errors with code
  ``batch-config``, at ``batch_task(...)`` and at ``task.reconfigure(...)``:
  a ``batch_size``, ``max_concurrent_calls``,
  ``max_concurrent_calls_per_key`` or ``max_attempts`` that is not an
  int >= 1, a ``batch_timeout``, ``max_weight``, ``debounce``,
  ``max_item_age`` or ``call_timeout`` that is not a finite number > 0
  (``0``, negative, ``True``, ``float("inf")``, ``math.nan``...), a
  ``retry_delay`` that is not a finite number >= 0, a ``debounce`` not below
  ``batch_timeout`` (both literals in the same call); at ``batch_task(...)``
  also ``max_weight`` without ``weight``, and a keyword within two edits of a
  setting's name (``batch_timout=``), which the runtime refuses as a taskiq
  label;
- ``weight=``, ``dedup_key=`` and ``group_by=`` at the decorator must take the
  function's item (code ``batch-config``); a lambda there is checked with its
  parameter typed as the item, so mypy reports the errors in its body
  (``lambda doc: doc.tokenz``);
- a generic batch function is typed with its type variables replaced by their
  bounds (an unbound ``list[T]`` takes items of any type).

Without the plugin mypy still checks ``.kiq`` through the overloads; the
differences are listed in the README's "Typing" section.

Each of these lives in its own module under ``_features``; the plugin class
below only looks a hook up by the fully qualified name mypy asks about.
"""

from collections.abc import Callable, Mapping
from typing import Final, final

from mypy.plugin import (
    AttributeContext,
    FunctionContext,
    MethodContext,
    MethodSigContext,
    Plugin,
)
from mypy.types import FunctionLike, Type

from batchtask_mypy._features import config, decorate, entry

_FunctionHook = Callable[[FunctionContext], Type]
_MethodSignatureHook = Callable[[MethodSigContext], FunctionLike]
_MethodHook = Callable[[MethodContext], Type]
_AttributeHook = Callable[[AttributeContext], Type]

_FUNCTION_HOOKS: Final[Mapping[str, _FunctionHook]] = {
    "batchtask._task.batch_task": config.check_batch_task,
}
"""``batch_task(...)``: its literal settings and misspelled ones."""

_METHOD_SIGNATURE_HOOKS: Final[Mapping[str, _MethodSignatureHook]] = {
    "batchtask._task._SharedDecorator.__call__": decorate.shared,
    "batchtask._task._PerItemDecorator.__call__": decorate.per_item,
}
"""``batch_task(...)(func)``: the task type, typed from the function."""

_METHOD_HOOKS: Final[Mapping[str, _MethodHook]] = {
    "batchtask._task.BatchTask.reconfigure": config.check_reconfigure,
}
"""``task.reconfigure(...)``: its literal settings."""

_ATTRIBUTE_HOOKS: Final[Mapping[str, _AttributeHook]] = {
    f"batchtask._task.BatchTask.{name}": entry.with_entry for name in entry.SENDERS
}
"""``task.kiq``: the item under the function's own parameter name."""


@final
class BatchTaskPlugin(Plugin):
    """Types ``batch_task`` decorators and checks their settings."""

    def get_function_hook(self, fullname: str) -> _FunctionHook | None:
        """Check the literal settings given to ``batch_task(...)``."""
        return _FUNCTION_HOOKS.get(fullname)

    def get_method_signature_hook(self, fullname: str) -> _MethodSignatureHook | None:
        """Type the decorator application ``batch_task(...)(func)``."""
        return _METHOD_SIGNATURE_HOOKS.get(fullname)

    def get_method_hook(self, fullname: str) -> _MethodHook | None:
        """Check the literal settings given to ``task.reconfigure(...)``."""
        return _METHOD_HOOKS.get(fullname)

    def get_attribute_hook(self, fullname: str) -> _AttributeHook | None:
        """Give ``task.kiq`` the item under its own parameter name and kind."""
        return _ATTRIBUTE_HOOKS.get(fullname)


def plugin(version: str) -> type[Plugin]:
    """Mypy's entry point: the plugin class (any mypy 1.x or later)."""
    return BatchTaskPlugin
