"""Functions batch_task cannot batch, and what a per-item function returns."""

# mypy.types first: mypy.maptype imports it in a cycle that only resolves in
# this order (mypy itself has loaded it before any plugin).
from mypy.types import (
    AnyType,
    CallableType,
    Instance,
    Overloaded,
    TupleType,
    Type,
    TypeOfAny,
    get_proper_type,
)

# isort: split
from mypy.maptype import map_instance_to_supertype
from mypy.messages import format_type, format_type_bare
from mypy.nodes import ARG_OPT, ARG_POS, FuncDef
from mypy.plugin import MethodSigContext
from mypy.subtypes import is_subtype
from mypy.typeops import tuple_fallback

from batchtask_mypy._codes import BATCH_FUNCTION
from batchtask_mypy._typeops import NOT_PER_ITEM, element_type, short_name


def reject_overloaded(ctx: MethodSigContext, func: Overloaded) -> None:
    """Report an overloaded function: the worker calls one signature."""
    name = func.items[0].name or "function"
    fail(
        ctx,
        f'batch_task cannot batch overloaded function "{short_name(name)}": '
        "the worker calls one signature",
        "batch one non-overloaded function",
    )


def function_name(func: CallableType) -> str:
    """The name errors give the decorated function."""
    definition = func.definition
    return short_name(definition.name if definition else (func.name or "function"))


def item_type(ctx: MethodSigContext, func: CallableType) -> Type | None:
    """The type of one item `func` batches; None after reporting why it cannot.

    A method, a function without a positional first parameter and one whose
    first parameter is not a ``list`` cannot batch.
    """
    definition = func.definition
    name = function_name(func)
    if isinstance(definition, FuncDef) and definition.info and not definition.is_static:
        fail(
            ctx,
            f'batch_task cannot batch method "{name}" of "{definition.info.name}": '
            "taskiq calls a task without an instance",
            f'define "{name}" at module level',
        )
        return None
    if not func.arg_kinds or func.arg_kinds[0] not in (ARG_POS, ARG_OPT):
        fail(
            ctx,
            f'batch_task cannot batch "{name}": it has no positional first '
            "parameter to receive the list of items",
            f'declare the items first, e.g. "def {name}(items: list[Item], ...)"',
        )
        return None
    first = get_proper_type(func.arg_types[0])
    if isinstance(first, AnyType):
        return first
    if isinstance(first, Instance) and first.type.fullname == "builtins.list":
        return first.args[0]
    param = func.arg_names[0] or "items"
    options = ctx.api.options
    element = element_type(ctx.api, first)
    suggested = format_type_bare(element if element is not None else first, options)
    fail(
        ctx,
        f'batch_task cannot batch "{name}": its first parameter "{param}" is '
        f"{format_type(first, options)}, not a list of items",
        f'annotate it "{param}: list[{suggested}]" and send one {suggested} per kiq',
    )
    return None


def per_item_result(ctx: MethodSigContext, value: Type, name: str) -> Type | None:
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
        and not any(proper.type.has_base(base) for base in NOT_PER_ITEM)
        and not is_subtype(proper, mapping)
        and is_subtype(proper, iterable)
    ):
        return map_instance_to_supertype(proper, iterable.type).args[0]
    shown = format_type(value, ctx.api.options)
    fail(
        ctx,
        f'batch_task(results="per_item") cannot batch "{name}": it returns '
        f"{shown}, not one result per item",
        "return a list with one result per item, in the items' order",
    )
    return None


def fail(ctx: MethodSigContext, problem: str, fix: str) -> None:
    """Report at the decorator that the function cannot batch, and the fix."""
    ctx.api.fail(f"{problem}. Fix: {fix}", ctx.context, code=BATCH_FUNCTION)
