"""``weight=``, ``dedup_key=``, ``group_by=`` checked against the function's items."""

from mypy.checker import TypeChecker
from mypy.messages import format_type
from mypy.nodes import (
    ARG_POS,
    CallExpr,
    Decorator,
    Expression,
    LambdaExpr,
    MemberExpr,
    NameExpr,
    RefExpr,
)
from mypy.plugin import MethodSigContext
from mypy.subtypes import find_member, is_subtype
from mypy.types import (
    AnyType,
    CallableType,
    FunctionLike,
    Instance,
    Overloaded,
    Type,
    TypeOfAny,
    get_proper_type,
)

from batchtask_mypy._codes import BATCH_CONFIG

_BATCH_TASK = "batchtask._task.batch_task"

_RETURNS = {
    "weight": "builtins.float",
    "dedup_key": "typing.Hashable",
    "group_by": "typing.Hashable",
}
"""The settings that are functions of one item, and what each must return."""


def check_callbacks(ctx: MethodSigContext, item: Type, name: str) -> None:
    """Check the decorator's ``weight=``, ``dedup_key=``, ``group_by=`` against `item`.

    The overloads type them ``Callable[[Any], ...]``, so mypy has checked
    their arity and return type but not that they take this task's items.
    A lambda is checked again with its parameter typed as the item (mypy's
    own errors in its body, like a missing attribute or a wrong return type,
    are then reported); any other function must accept one item.
    """
    call = _settings_call(ctx)
    if call is None:
        return
    for setting, expr in zip(call.arg_names, call.args, strict=True):
        returns = _RETURNS.get(setting or "")
        if setting is None or returns is None:
            continue
        if isinstance(expr, LambdaExpr):
            expected = _function_of(ctx, item, ctx.api.named_generic_type(returns, []))
            ctx.api.get_expression_type(expr, type_context=expected)
            continue
        given = _callable(_inferred(ctx, expr))
        anything = AnyType(TypeOfAny.special_form)
        # Not a function of one argument at all: mypy has reported it.
        if given is None or not is_subtype(
            given, _function_of(ctx, anything, anything)
        ):
            continue
        if is_subtype(given, _function_of(ctx, item, anything)):
            continue
        options = ctx.api.options
        shown = format_type(item, options)
        function = (
            "an overloaded function"
            if isinstance(given, Overloaded)
            else format_type(given, options)
        )
        ctx.api.fail(
            f"batch_task(): {setting}={_source(expr)} cannot take an item of "
            f'"{name}": it is {function}, the items are {shown}. '
            f"Fix: give {setting} a function of one {shown}",
            expr,
            code=BATCH_CONFIG,
        )


def _function_of(ctx: MethodSigContext, item: Type, returns: Type) -> CallableType:
    """``Callable[[item], returns]``."""
    function = ctx.api.named_generic_type("builtins.function", [])
    return CallableType([item], [ARG_POS], [None], returns, function)


def _settings_call(ctx: MethodSigContext) -> CallExpr | None:
    """The ``batch_task(...)`` call whose decorator is being applied, if seen.

    ``batch_task(...)(func)`` and ``@batch_task(...)`` have it; a decorator
    kept in a variable first (``dec = batch_task(...)``) does not.
    """
    context = ctx.context
    if isinstance(context, CallExpr):
        callee = context.callee
        return (
            callee if isinstance(callee, CallExpr) and _is_batch_task(callee) else None
        )
    if not isinstance(context, Decorator) or len(ctx.args[0]) != 1:
        return None
    applied = ctx.args[0][0]  # mypy's stand-in, placed at its decorator
    for decorator in context.decorators:
        if (
            decorator.line == applied.line
            and decorator.column == applied.column
            and _is_batch_task(decorator)
        ):
            assert isinstance(decorator, CallExpr)
            return decorator
    return None


def _is_batch_task(expr: Expression) -> bool:
    return (
        isinstance(expr, CallExpr)
        and isinstance(expr.callee, RefExpr)
        and expr.callee.fullname == _BATCH_TASK
    )


def _inferred(ctx: MethodSigContext, expr: Expression) -> Type | None:
    """The type mypy gave `expr` when it checked ``batch_task(...)``."""
    if isinstance(ctx.api, TypeChecker):
        return ctx.api.lookup_type_or_none(expr)
    return None


def _callable(given: Type | None) -> FunctionLike | None:
    """`given` as a signature (an instance by its ``__call__``), or None.

    None for ``None``, ``Any`` and anything else mypy judged at the call.
    """
    proper = get_proper_type(given)
    if isinstance(proper, Instance):
        proper = get_proper_type(
            find_member("__call__", proper, proper, is_operator=True)
        )
    return proper if isinstance(proper, FunctionLike) else None


def _source(expr: Expression) -> str:
    """A short rendering of the setting's expression for messages."""
    if isinstance(expr, (NameExpr, MemberExpr)):
        return expr.name
    if isinstance(expr, CallExpr) and isinstance(expr.callee, (NameExpr, MemberExpr)):
        return f"{expr.callee.name}({'...' if expr.args else ''})"
    return "..."
