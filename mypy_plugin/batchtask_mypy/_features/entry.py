"""``task.kiq`` takes the item under the function's own parameter name.

``BatchTask.kiq`` is declared with the item positional-only and named
``item`` (what every checker and editor shows), then the function's other
parameters ``P``. The runtime binds the arguments with the function's own
signature, so ``save.kiq(rows=row)`` works; `decorate` typed the task's
``EntryP`` that way, and here ``kiq`` gets that ``EntryP`` in place of its
``item, *P``. mypy asks for ``kiq`` as an attribute: it is decorated.
"""

from mypy.plugin import AttributeContext
from mypy.types import CallableType, Instance, Parameters, Type, get_proper_type

_TASK = "batchtask._task.BatchTask"
SENDERS = ("kiq",)
"""The methods declared with a positional-only ``item``, then ``P``."""


def with_entry(ctx: AttributeContext) -> Type:
    """The bound method with the task's ``EntryP`` as its item and the rest."""
    method = get_proper_type(ctx.default_attr_type)
    task = get_proper_type(ctx.type)
    if not (
        isinstance(method, CallableType)
        and isinstance(task, Instance)
        and task.type.fullname == _TASK
        and len(task.args) == 5
    ):
        return ctx.default_attr_type
    entry = get_proper_type(task.args[2])
    # EntryP is only the plugin's own when `decorate` typed the task.
    if not isinstance(entry, Parameters) or entry.is_ellipsis_args:
        return ctx.default_attr_type
    fixed = len(method.arg_types) - len(entry.arg_types)
    if fixed < 0:
        return ctx.default_attr_type
    return CallableType(
        [*method.arg_types[:fixed], *entry.arg_types],
        [*method.arg_kinds[:fixed], *entry.arg_kinds],
        [*method.arg_names[:fixed], *entry.arg_names],
        method.ret_type,
        method.fallback,
        name=method.name,
        definition=method.definition,
        variables=method.variables,
    )
