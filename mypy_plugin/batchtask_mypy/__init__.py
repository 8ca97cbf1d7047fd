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
- literal ``batch_size`` / ``batch_timeout`` values the runtime would reject
  (``0``, negative, ``True``, ``float("inf")``, ``math.nan``...) are errors
  with code ``batch-config``;
- a generic batch function is typed with its type variables replaced by their
  bounds (an unbound ``list[T]`` takes items of any type).

Without the plugin mypy still checks ``.kiq`` through the overloads; the
differences are listed in the README's "Typing" section.
"""

import math
from collections.abc import Callable

# mypy.types first: mypy.maptype and mypy.expandtype import it in a cycle that
# only resolves in this order (mypy itself has loaded it before any plugin).
from mypy.types import (
    AnyType,
    CallableType,
    FunctionLike,
    Instance,
    LiteralType,
    Overloaded,
    Parameters,
    ProperType,
    TupleType,
    Type,
    TypeOfAny,
    TypeVarId,
    TypeVarType,
    UnionType,
    get_proper_type,
)

# isort: split
from mypy.errorcodes import ErrorCode
from mypy.expandtype import expand_type
from mypy.maptype import map_instance_to_supertype
from mypy.messages import format_type, format_type_bare
from mypy.nodes import (
    ARG_OPT,
    ARG_POS,
    CallExpr,
    Expression,
    FloatExpr,
    FuncDef,
    IntExpr,
    NameExpr,
    RefExpr,
    StrExpr,
    UnaryExpr,
    Var,
)
from mypy.options import Options
from mypy.plugin import (
    CheckerPluginInterface,
    FunctionContext,
    MethodSigContext,
    Plugin,
)
from mypy.subtypes import is_subtype
from mypy.typeops import tuple_fallback

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

_TASK = "batchtask._task.BatchTask"
_BATCH_TASK = "batchtask._task.batch_task"
_DECORATORS = {
    "batchtask._task._SharedDecorator.__call__": False,
    "batchtask._task._PerItemDecorator.__call__": True,
}
_DEPENDS = frozenset(
    {
        "taskiq_dependencies.dependency.Depends",
        "taskiq_dependencies.dependency.Dependency",
    }
)
_NOT_PER_ITEM = ("builtins.str", "builtins.bytes", "builtins.bytearray")


class BatchTaskPlugin(Plugin):
    """Types ``batch_task`` decorators and checks their settings."""

    def get_method_signature_hook(
        self, fullname: str
    ) -> Callable[[MethodSigContext], FunctionLike] | None:
        """Type the decorator application ``batch_task(...)(func)``."""
        per_item = _DECORATORS.get(fullname)
        if per_item is None:
            return None
        return lambda ctx: _decorate(ctx, per_item=per_item)

    def get_function_hook(
        self, fullname: str
    ) -> Callable[[FunctionContext], Type] | None:
        """Check the literal settings given to ``batch_task(...)``."""
        if fullname == _BATCH_TASK:
            return _check_config
        return None


def plugin(version: str) -> type[Plugin]:
    """Mypy's entry point: the plugin class (any mypy 1.x or later)."""
    return BatchTaskPlugin


# --- the decorator -----------------------------------------------------------


def _decorate(ctx: MethodSigContext, *, per_item: bool) -> FunctionLike:
    """The signature of one decorator application, typed from the function."""
    default = ctx.default_signature
    if len(ctx.args) != 1 or len(ctx.args[0]) != 1:
        return default
    given = ctx.api.get_expression_type(ctx.args[0][0])
    func = get_proper_type(given)
    if isinstance(func, Overloaded):
        name = func.items[0].name or "function"
        _fail(
            ctx,
            f'batch_task cannot batch overloaded function "{_short(name)}": '
            "the worker calls one signature",
            "batch one non-overloaded function",
        )
        return _failed(default)
    if not isinstance(func, CallableType):
        return default
    task = _task_type(ctx, func, per_item=per_item)
    if task is None:
        return _failed(default)
    return _signature(default, given, task)


def _task_type(
    ctx: MethodSigContext, func: CallableType, *, per_item: bool
) -> Instance | None:
    """``BatchTask[Item, Rest, Entry, Result, Call]`` for `func`, or None."""
    definition = func.definition
    name = _short(definition.name if definition else (func.name or "function"))
    if isinstance(definition, FuncDef) and definition.info and not definition.is_static:
        _fail(
            ctx,
            f'batch_task cannot batch method "{name}" of "{definition.info.name}": '
            "taskiq calls a task without an instance",
            f'define "{name}" at module level',
        )
        return None
    func = _bind_type_variables(func)
    if not func.arg_kinds or func.arg_kinds[0] not in (ARG_POS, ARG_OPT):
        _fail(
            ctx,
            f'batch_task cannot batch "{name}": it has no positional first '
            "parameter to receive the list of items",
            f'declare the items first, e.g. "def {name}(items: list[Item], ...)"',
        )
        return None
    item = _item_type(ctx, func, name)
    if item is None:
        return None
    returned = func.ret_type
    value = _awaited(ctx.api, returned)
    result: Type | None = value
    if per_item:
        result = _per_item_result(ctx, value, name)
    if result is None:
        return None
    injected = _injected(func)
    rest = [i for i in range(1, len(func.arg_types)) if i not in injected]
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


def _item_type(ctx: MethodSigContext, func: CallableType, name: str) -> Type | None:
    """The element type of the first parameter's list; None after an error."""
    first = get_proper_type(func.arg_types[0])
    if isinstance(first, AnyType):
        return first
    if isinstance(first, Instance) and first.type.fullname == "builtins.list":
        return first.args[0]
    param = func.arg_names[0] or "items"
    options = _options(ctx.api)
    element = _element_type(ctx.api, first)
    suggested = format_type_bare(element if element is not None else first, options)
    _fail(
        ctx,
        f'batch_task cannot batch "{name}": its first parameter "{param}" is '
        f"{format_type(first, options)}, not a list of items",
        f'annotate it "{param}: list[{suggested}]" and send one {suggested} per kiq',
    )
    return None


def _per_item_result(ctx: MethodSigContext, value: Type, name: str) -> Type | None:
    """One item's result when the function returns one per item; None after an error."""
    proper = get_proper_type(value)
    if isinstance(proper, AnyType):
        return proper
    if isinstance(proper, TupleType):
        proper = tuple_fallback(proper)
    iterable = ctx.api.named_generic_type(
        "typing.Iterable", [AnyType(TypeOfAny.special_form)]
    )
    mapping = ctx.api.named_generic_type(
        "typing.Mapping",
        [AnyType(TypeOfAny.special_form), AnyType(TypeOfAny.special_form)],
    )
    if (
        isinstance(proper, Instance)
        and not any(proper.type.has_base(base) for base in _NOT_PER_ITEM)
        and not is_subtype(proper, mapping)
        and is_subtype(proper, iterable)
    ):
        return map_instance_to_supertype(proper, iterable.type).args[0]
    shown = format_type(value, _options(ctx.api))
    _fail(
        ctx,
        f'batch_task(results="per_item") cannot batch "{name}": it returns '
        f"{shown}, not one result per item",
        "return a list with one result per item, in the items' order",
    )
    return None


def _element_type(api: CheckerPluginInterface, given: ProperType) -> Type | None:
    """What iterating `given` yields, for a collection that is not a string."""
    iterable = api.named_generic_type(
        "typing.Iterable", [AnyType(TypeOfAny.special_form)]
    )
    if (
        isinstance(given, Instance)
        and not any(given.type.has_base(base) for base in _NOT_PER_ITEM)
        and is_subtype(given, iterable)
    ):
        return map_instance_to_supertype(given, iterable.type).args[0]
    return None


def _awaited(api: CheckerPluginInterface, returned: Type) -> Type:
    """What calling the function gives once awaited (the runtime awaits it)."""
    proper = get_proper_type(returned)
    awaitable = api.named_generic_type(
        "typing.Awaitable", [AnyType(TypeOfAny.special_form)]
    )
    if isinstance(proper, Instance) and is_subtype(proper, awaitable):
        return map_instance_to_supertype(proper, awaitable.type).args[0]
    return returned


def _injected(func: CallableType) -> set[int]:
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


def _bind_type_variables(func: CallableType) -> CallableType:
    """Replace the function's own type variables by their bounds or values."""
    if not func.variables:
        return func
    replacements: dict[TypeVarId, Type] = {}
    for variable in func.variables:
        if not isinstance(variable, TypeVarType):
            return func
        if variable.values:
            replacements[variable.id] = UnionType.make_union(variable.values)
        else:
            replacements[variable.id] = variable.upper_bound
    bound = get_proper_type(expand_type(func, replacements))
    assert isinstance(bound, CallableType)
    return CallableType(
        bound.arg_types,
        bound.arg_kinds,
        bound.arg_names,
        bound.ret_type,
        bound.fallback,
        name=func.name,
        definition=func.definition,
    )


def _signature(default: CallableType, func: Type, task: Type) -> CallableType:
    """The decorator's signature, ``(func) -> task``, without type variables."""
    return CallableType(
        [func],
        [ARG_POS],
        default.arg_names[:1],
        task,
        default.fallback,
        name=default.name,
    )


def _failed(default: CallableType) -> CallableType:
    """A signature that accepts the function and gives Any, after an error."""
    error = AnyType(TypeOfAny.from_error)
    return _signature(default, error, error)


# --- settings ------------------------------------------------------------------


def _check_config(ctx: FunctionContext) -> Type:
    """Report literal settings that ``BatchConfig.checked`` would reject."""
    for formal, name in enumerate(ctx.callee_arg_names):
        if name not in ("batch_size", "batch_timeout") or not ctx.args[formal]:
            continue
        expr = ctx.args[formal][0]
        value = _literal_number(expr, ctx.arg_types[formal][0])
        if value is None:
            continue
        if name == "batch_size":
            bad = isinstance(value, bool) or (isinstance(value, int) and value < 1)
            rule = "must be an int >= 1 (the most items one call receives)"
            fix = "pass e.g. batch_size=100"
        else:
            bad = isinstance(value, bool) or not math.isfinite(value) or value <= 0
            rule = (
                "must be a finite number of seconds > 0; it bounds how long an "
                "item may wait for its batch to fill"
            )
            fix = "pass e.g. batch_timeout=2.0"
        if bad:
            ctx.api.fail(
                f"batch_task(): {name}={value!r} {rule}. Fix: {fix}",
                expr,
                code=BATCH_CONFIG,
            )
    return ctx.default_return_type


def _literal_number(expr: Expression, given: Type) -> int | float | None:
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


# --- helpers ---------------------------------------------------------------------


def _fail(ctx: MethodSigContext, problem: str, fix: str) -> None:
    ctx.api.fail(f"{problem}. Fix: {fix}", ctx.context, code=BATCH_FUNCTION)


def _short(name: str) -> str:
    """``save`` from mypy's ``save of Repo`` style callable names."""
    return name.split(" of ", 1)[0]


def _options(api: CheckerPluginInterface) -> Options:
    return api.options
