"""The decorated function's task type: what ``.kiq`` and its kin take and give."""

from mypy.plugin import MethodSigContext
from mypy.types import (
    CallableType,
    FunctionLike,
    Instance,
    Overloaded,
    Parameters,
    Type,
    get_proper_type,
)

from batchtask_mypy._features import callbacks, function
from batchtask_mypy._features.generic import bind_type_variables
from batchtask_mypy._features.injected import injected
from batchtask_mypy._typeops import awaited, failed, signature

_TASK = "batchtask._task.BatchTask"


def shared(ctx: MethodSigContext) -> FunctionLike:
    """``batch_task(..., results="shared")(func)``."""
    return _decorate(ctx, per_item=False)


def per_item(ctx: MethodSigContext) -> FunctionLike:
    """``batch_task(..., results="per_item")(func)``."""
    return _decorate(ctx, per_item=True)


def _decorate(ctx: MethodSigContext, *, per_item: bool) -> FunctionLike:
    """The signature of one decorator application, typed from the function."""
    default = ctx.default_signature
    if len(ctx.args) != 1 or len(ctx.args[0]) != 1:
        return default
    given = ctx.api.get_expression_type(ctx.args[0][0])
    func = get_proper_type(given)
    if isinstance(func, Overloaded):
        function.reject_overloaded(ctx, func)
        return failed(default)
    if not isinstance(func, CallableType):
        return default
    task = _task_type(ctx, func, per_item=per_item)
    if task is None:
        return failed(default)
    return signature(default, given, task)


def _task_type(
    ctx: MethodSigContext, func: CallableType, *, per_item: bool
) -> Instance | None:
    """``BatchTask[Item, Rest, Entry, Result, Call]`` for `func`, or None.

    ``Entry`` is the item under the function's own first parameter name and
    kind, then the rest without the parameters taskiq injects.
    """
    func = bind_type_variables(func)
    item = function.item_type(ctx, func)
    if item is None:
        return None
    callbacks.check_callbacks(ctx, item, function.function_name(func))
    returned = func.ret_type
    value = awaited(ctx.api, returned)
    result: Type | None = value
    if per_item:
        result = function.per_item_result(ctx, value, function.function_name(func))
    if result is None:
        return None
    skipped = injected(func)
    rest = [i for i in range(1, len(func.arg_types)) if i not in skipped]
    params = Parameters(
        [func.arg_types[i] for i in rest],
        [func.arg_kinds[i] for i in rest],
        [func.arg_names[i] for i in rest],
    )
    entry = Parameters(
        [item, *params.arg_types],
        [func.arg_kinds[0], *params.arg_kinds],
        [func.arg_names[0], *params.arg_names],
    )
    declared = get_proper_type(ctx.default_signature.ret_type)
    assert isinstance(declared, Instance)
    assert declared.type.fullname == _TASK
    return Instance(declared.type, [item, params, entry, result, returned])
