"""Parameters taskiq injects (``= TaskiqDepends()``) are not kiq arguments."""

from mypy.nodes import CallExpr, Expression, FuncDef, RefExpr
from mypy.types import CallableType

_DEPENDS = frozenset(
    {
        "taskiq_dependencies.dependency.Depends",
        "taskiq_dependencies.dependency.Dependency",
    }
)


def injected(func: CallableType) -> set[int]:
    """Indices of the parameters taskiq injects (``TaskiqDepends`` defaults)."""
    definition = func.definition
    if not isinstance(definition, FuncDef):
        return set()
    arguments = definition.arguments
    if [a.variable.name for a in arguments] != [
        n for n in func.arg_names if n is not None
    ] or len(arguments) != len(func.arg_names):
        return set()
    return {
        index
        for index, argument in enumerate(arguments)
        if index > 0 and _is_depends(argument.initializer)
    }


def _is_depends(expr: Expression | None) -> bool:
    return (
        isinstance(expr, CallExpr)
        and isinstance(expr.callee, RefExpr)
        and expr.callee.fullname in _DEPENDS
    )
