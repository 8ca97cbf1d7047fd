"""Type surgery shared by the features: awaiting, iterating, signatures."""

# mypy.types first: mypy.maptype and mypy.expandtype import it in a cycle that
# only resolves in this order (mypy itself has loaded it before any plugin).
from mypy.types import (
    AnyType,
    CallableType,
    Instance,
    ProperType,
    Type,
    TypeOfAny,
    get_proper_type,
)

# isort: split
from mypy.maptype import map_instance_to_supertype
from mypy.nodes import ARG_POS
from mypy.plugin import CheckerPluginInterface
from mypy.subtypes import is_subtype

NOT_PER_ITEM = ("builtins.str", "builtins.bytes", "builtins.bytearray")
"""Iterables that are one value, not one result per item."""


def element_type(api: CheckerPluginInterface, given: ProperType) -> Type | None:
    """What iterating `given` yields, for a collection that is not a string."""
    iterable = api.named_generic_type(
        "typing.Iterable", [AnyType(TypeOfAny.special_form)]
    )
    if (
        isinstance(given, Instance)
        and not any(given.type.has_base(base) for base in NOT_PER_ITEM)
        and is_subtype(given, iterable)
    ):
        return map_instance_to_supertype(given, iterable.type).args[0]
    return None


def awaited(api: CheckerPluginInterface, returned: Type) -> Type:
    """What calling the function gives once awaited (the runtime awaits it)."""
    proper = get_proper_type(returned)
    awaitable = api.named_generic_type(
        "typing.Awaitable", [AnyType(TypeOfAny.special_form)]
    )
    if isinstance(proper, Instance) and is_subtype(proper, awaitable):
        return map_instance_to_supertype(proper, awaitable.type).args[0]
    return returned


def signature(default: CallableType, func: Type, task: Type) -> CallableType:
    """The decorator's signature, ``(func) -> task``, without type variables."""
    return CallableType(
        [func],
        [ARG_POS],
        default.arg_names[:1],
        task,
        default.fallback,
        name=default.name,
    )


def failed(default: CallableType) -> CallableType:
    """A signature that accepts the function and gives Any, after an error."""
    error = AnyType(TypeOfAny.from_error)
    return signature(default, error, error)


def short_name(name: str) -> str:
    """``save`` from mypy's ``save of Repo`` style callable names."""
    return name.split(" of ", 1)[0]
