"""What a setting's expression is known to be at type-check time."""

import math

from mypy.nodes import (
    CallExpr,
    Expression,
    FloatExpr,
    IntExpr,
    NameExpr,
    RefExpr,
    StrExpr,
    UnaryExpr,
    Var,
)
from mypy.types import Instance, LiteralType, Type, get_proper_type


def literal_number(expr: Expression, given: Type) -> int | float | None:
    """The number `expr` is known to be at type-check time, if any."""
    proper = get_proper_type(given)
    if isinstance(proper, Instance) and proper.last_known_value is not None:
        proper = proper.last_known_value
    if isinstance(proper, LiteralType) and isinstance(proper.value, int):
        return proper.value
    return _expression_number(expr)


def _expression_number(expr: Expression) -> int | float | None:
    if isinstance(expr, (IntExpr, FloatExpr)):
        return expr.value
    if isinstance(expr, UnaryExpr) and expr.op in ("-", "+"):
        inner = _expression_number(expr.expr)
        if inner is None or isinstance(inner, bool):
            return None
        return -inner if expr.op == "-" else inner
    if (
        isinstance(expr, CallExpr)
        and isinstance(expr.callee, RefExpr)
        and expr.callee.fullname == "builtins.float"
        and len(expr.args) == 1
        and isinstance(expr.args[0], StrExpr)
    ):
        try:
            return float(expr.args[0].value)
        except ValueError:
            return None
    if isinstance(expr, RefExpr):
        if expr.fullname in ("math.inf", "math.nan"):
            return math.inf if expr.fullname == "math.inf" else math.nan
        if expr.fullname in ("builtins.True", "builtins.False"):
            return expr.fullname == "builtins.True"
        node = expr.node
        if isinstance(expr, NameExpr) and isinstance(node, Var):
            final = node.final_value
            if isinstance(final, (int, float)):
                return final
    return None
