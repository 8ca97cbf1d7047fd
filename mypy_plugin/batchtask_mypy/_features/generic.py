"""A generic batch function is typed with its type variables' bounds."""

# mypy.types first: mypy.expandtype imports it in a cycle that only resolves
# in this order (mypy itself has loaded it before any plugin).
from mypy.types import (
    CallableType,
    Type,
    TypeVarId,
    TypeVarType,
    UnionType,
    get_proper_type,
)

# isort: split
from mypy.expandtype import expand_type


def bind_type_variables(func: CallableType) -> CallableType:
    """Replace the function's own type variables by their bounds or values.

    An unbound ``list[T]`` so takes items of any type (``object``).
    """
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
