"""Literal settings ``batch_task(...)`` and ``.reconfigure(...)`` would reject."""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from mypy.nodes import ARG_NAMED, ArgKind, Context, Expression, NameExpr
from mypy.plugin import CheckerPluginInterface, FunctionContext, MethodContext
from mypy.types import Instance, LiteralType, NoneType, Type, get_proper_type

from batchtask_mypy._codes import BATCH_CONFIG
from batchtask_mypy._features import labels
from batchtask_mypy._literals import literal_number

Number = int | float


@dataclass(frozen=True)
class _Rule:
    """What one numeric setting must be, as the runtime says it."""

    kind: Literal["count", "seconds", "number", "delay"]
    problem: str
    fix: str

    def breaks(self, value: Number) -> bool:
        """Whether the runtime's ``BatchConfig.checked`` rejects `value`."""
        if isinstance(value, bool):
            return True
        if self.kind == "count":
            # A float is a type error mypy reports itself.
            return isinstance(value, int) and value < 1
        if self.kind == "delay":
            return not math.isfinite(value) or value < 0
        return not math.isfinite(value) or value <= 0

    def message(self, name: str, value: Number) -> str:
        """What is wrong with `value`, and the fix."""
        if self.kind == "count":
            rule = f"must be an int >= 1 ({self.problem})"
        elif self.kind == "delay":
            rule = f"must be a finite number of seconds >= 0; {self.problem}"
        else:
            unit = " of seconds" if self.kind == "seconds" else ""
            rule = f"must be a finite number{unit} > 0; {self.problem}"
        return f"{name}={value!r} {rule}. Fix: {self.fix}"


_RULES = {
    "batch_size": _Rule(
        "count", "the most items one call receives", "pass e.g. batch_size=100"
    ),
    "batch_timeout": _Rule(
        "seconds",
        "it bounds how long an item may wait for its batch to fill",
        "pass e.g. batch_timeout=2.0",
    ),
    "max_weight": _Rule(
        "number",
        "the most the weights of one call's items may add up to",
        "pass e.g. max_weight=8000 with weight=lambda doc: doc.tokens",
    ),
    "max_concurrent_calls": _Rule(
        "count",
        "the most calls of this task running at once in a worker process",
        "pass e.g. max_concurrent_calls=2, or None for no limit",
    ),
    "max_concurrent_calls_per_key": _Rule(
        "count",
        "the most calls of one group key running at once in a worker process",
        "pass e.g. max_concurrent_calls_per_key=1, or None for no limit",
    ),
    "debounce": _Rule(
        "seconds",
        "seconds without a new item after which a batch is called",
        "pass e.g. debounce=0.2",
    ),
    "max_item_age": _Rule(
        "seconds",
        "seconds after sending after which an item is not passed any more",
        "pass e.g. max_item_age=3600",
    ),
    "max_attempts": _Rule(
        "count",
        "the most calls one item is passed to before its failure is final",
        "pass e.g. max_attempts=5, or None for no retries",
    ),
    "retry_delay": _Rule(
        "delay",
        "a retried item waits this long before it joins a batch again",
        "pass e.g. retry_delay=30.0, or 0 to retry in the next batch",
    ),
    "call_timeout": _Rule(
        "seconds",
        "a call running longer is cancelled and its items fail",
        "pass e.g. call_timeout=30.0, or None for no limit",
    ),
}
"""The runtime's rules (``batchtask._config``) for its numeric settings.

``bisect_on_error`` and ``adaptive`` are typed ``bool``: mypy itself rejects
every value the runtime would (an ``int``, ``None``).
"""


def check_batch_task(ctx: FunctionContext) -> Type:
    """``batch_task(...)``: values, ``debounce``, ``max_weight``, misspellings."""
    given = _given(ctx.callee_arg_names, ctx.args, ctx.arg_kinds, ctx.arg_types)
    numbers = _check_values(ctx.api, "batch_task", given)
    _check_debounce(ctx.api, "batch_task", given, numbers)
    _check_max_weight(ctx.api, given, numbers)
    labels.check_misspelled(ctx)
    return ctx.default_return_type


def check_reconfigure(ctx: MethodContext) -> Type:
    """``task.reconfigure(...)``: literal values, ``debounce`` in the same call."""
    given = _given(ctx.callee_arg_names, ctx.args, ctx.arg_kinds, ctx.arg_types)
    numbers = _check_values(ctx.api, "reconfigure", given)
    _check_debounce(ctx.api, "reconfigure", given, numbers)
    return ctx.default_return_type


_Given = dict[str, tuple[Expression, Type]]


def _given(
    names: Sequence[str | None],
    args: Sequence[Sequence[Expression]],
    kinds: Sequence[Sequence[ArgKind]],
    types: Sequence[Sequence[Type]],
) -> _Given:
    """Each setting passed as ``name=value``: its expression and its type.

    A setting that comes from ``**mapping`` is left out: its value is unknown.
    """
    return {
        name: (args[formal][0], types[formal][0])
        for formal, name in enumerate(names)
        if name is not None and list(kinds[formal]) == [ARG_NAMED]
    }


def _check_values(
    api: CheckerPluginInterface, where: str, given: _Given
) -> dict[str, Number]:
    """Report literal values the runtime rejects; the ones it accepts, by name."""
    accepted: dict[str, Number] = {}
    for name, (expr, type_) in given.items():
        rule = _RULES.get(name)
        value = None if rule is None else literal_number(expr, type_)
        if rule is None or value is None:
            continue
        if rule.breaks(value):
            _fail(api, f"{where}(): {rule.message(name, value)}", expr)
        else:
            accepted[name] = value
    return accepted


def _check_debounce(
    api: CheckerPluginInterface,
    where: str,
    given: _Given,
    numbers: dict[str, Number],
) -> None:
    """``debounce`` must stay below ``batch_timeout`` (both literals here)."""
    debounce, timeout = numbers.get("debounce"), numbers.get("batch_timeout")
    if debounce is None or timeout is None or debounce < timeout:
        return
    _fail(
        api,
        f"{where}(): debounce={debounce!r} must be below "
        f"batch_timeout={timeout!r}, which stays the hard bound on an item's "
        "wait. Fix: pass a shorter debounce or a longer batch_timeout",
        given["debounce"][0],
    )


def _check_max_weight(
    api: CheckerPluginInterface, given: _Given, numbers: dict[str, Number]
) -> None:
    """``max_weight`` (not None) needs ``weight=`` (not None)."""
    weight = given.get("weight")
    if "max_weight" not in given or (weight is not None and not _is_none(*weight)):
        return
    expr, type_ = given["max_weight"]
    value = numbers.get("max_weight")
    rejected = value is None and literal_number(expr, type_) is not None
    if _may_be_none(type_) or rejected:
        return  # None, or a value reported already
    shown = "max_weight" if value is None else f"max_weight={value!r}"
    _fail(
        api,
        f"batch_task(): {shown} needs weight=, the function that gives one "
        "item's weight. Fix: pass e.g. weight=lambda doc: doc.tokens",
        expr,
    )


def _is_none(expr: Expression, type_: Type) -> bool:
    """Whether the setting is given as None."""
    if isinstance(expr, NameExpr) and expr.fullname == "builtins.None":
        return True
    return isinstance(get_proper_type(type_), NoneType)


def _may_be_none(type_: Type) -> bool:
    """Whether a value of `type_` may be None (Any and unions included)."""
    proper = get_proper_type(type_)
    return not isinstance(proper, (Instance, LiteralType))


def _fail(api: CheckerPluginInterface, message: str, context: Context) -> None:
    api.fail(message, context, code=BATCH_CONFIG)
