"""What one message's arguments mean for a batch function.

A batch function looks like ``f(items: list[Item], *rest, *injected)``:

- the *item* parameter is the first one; each message carries one item;
- the *extra* parameters (``rest``) are sent with every item; items whose
  extra arguments are equal (after binding, defaults applied) share a batch;
- the *injected* parameters are taskiq dependencies (``TaskiqDepends``
  defaults or ``Annotated[..., TaskiqDepends()]``); taskiq resolves them per
  message on the worker and they never take part in grouping.

`BatchSignature.of` does all the inspection once, when the task is declared;
`bind` and `validate_item` are the per-message work on the worker, `check` the
producer's, and they stay cheap.
"""

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, NamedTuple, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError
from taskiq_dependencies.dependency import Dependency

from batchtask._errors import BatchArgumentError, BatchConfigError, ItemValidationError

_P = inspect.Parameter
_POSITIONAL = (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)
_MISSING: Any = _P.empty

GroupKey = Hashable


class BoundItem(NamedTuple):
    """One message's arguments, split the way a batch call needs them."""

    item: Any
    """The item, validated (see `BatchSignature.bind`)."""
    args: tuple[Any, ...]
    """Extra positional arguments, passed after the list of items."""
    kwargs: Mapping[str, Any]
    """Extra keyword arguments (keyword-only and ``**kwargs`` parameters)."""
    injected: Mapping[str, Any]
    """Dependencies taskiq resolved for this message, by parameter name."""
    key: GroupKey
    """Equal for items whose extra arguments are equal: they share a batch."""


@dataclasses.dataclass(frozen=True, slots=True)
class BatchSignature:
    """The parameters of one batch function, split once at registration."""

    task_name: str
    item_name: str
    item_type: Any
    """The element type of the item list, or `Any` when it says nothing."""
    positional: tuple[str, ...]
    """Extra parameters that can be passed by position, in order."""
    positional_call: int
    """How many of `positional` the call passes by position; the rest follow
    an injected parameter and go by keyword."""
    positional_only: frozenset[str]
    var_positional: str | None
    keyword_only: tuple[str, ...]
    var_keyword: str | None
    defaults: Mapping[str, Any]
    injected: tuple[str, ...]
    entry_signature: inspect.Signature
    """The per-message signature taskiq sees: ``(item, *rest, *injected)``."""
    entry_annotations: Mapping[str, Any]
    """Annotations of the extra and injected parameters, as taskiq resolves them."""
    _item_adapter: TypeAdapter[Any] | None
    _plain_arity: int | None
    """``1 + len(positional)`` when every extra parameter is a plain positional
    one (no injected, ``*args``, keyword-only or ``**kwargs`` parameter):
    then a message with exactly that many positional arguments and no keyword
    argument binds without inspection. None otherwise."""

    @classmethod
    def of(cls, func: Callable[..., Any], task_name: str) -> "BatchSignature":
        """Split `func`'s parameters; raise `BatchConfigError` if it cannot batch."""
        try:
            signature = inspect.signature(func)
            hints = typing.get_type_hints(func, include_extras=True)
        except (NameError, TypeError, ValueError) as exc:
            raise _config_error(
                task_name,
                f"its signature or annotations cannot be resolved ({exc})",
                "make every annotation importable at module level",
            ) from exc
        params = list(signature.parameters.values())
        if not params or params[0].kind not in _POSITIONAL:
            raise _config_error(
                task_name,
                "it has no positional first parameter to receive the list of items",
                "declare the items first, e.g. "
                f"def {_func_name(func)}(items: list[Item], ...)",
            )
        first = params[0]
        item_type = _item_type(task_name, func, first, hints.get(first.name))
        rest = [
            p.replace(annotation=hints.get(p.name, p.annotation)) for p in params[1:]
        ]
        injected = tuple(p.name for p in rest if _is_injected(p))
        extra = [p for p in rest if p.name not in injected]

        positional_call = _positional_call(task_name, rest, injected)
        item_param = _P(first.name, first.kind)
        entry_signature = signature.replace(
            parameters=[item_param, *rest],
            return_annotation=_MISSING,
        )
        entry_annotations = {
            p.name: _strip_annotated(p.annotation)
            for p in rest
            if p.annotation is not _MISSING
        }
        return cls(
            task_name=task_name,
            item_name=first.name,
            item_type=item_type,
            positional=tuple(p.name for p in extra if p.kind in _POSITIONAL),
            positional_call=positional_call,
            positional_only=frozenset(
                p.name for p in params if p.kind is _P.POSITIONAL_ONLY
            ),
            var_positional=next(
                (p.name for p in extra if p.kind is _P.VAR_POSITIONAL), None
            ),
            keyword_only=tuple(p.name for p in extra if p.kind is _P.KEYWORD_ONLY),
            var_keyword=next((p.name for p in extra if p.kind is _P.VAR_KEYWORD), None),
            defaults={p.name: p.default for p in extra if p.default is not _MISSING},
            injected=injected,
            entry_signature=entry_signature,
            entry_annotations=entry_annotations,
            _item_adapter=None if item_type is Any else TypeAdapter(item_type),
            _plain_arity=(
                None
                if injected or any(p.kind not in _POSITIONAL for p in extra)
                else 1 + len(extra)
            ),
        )

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> BoundItem:
        """Bind one message's arguments on the worker: validate the item, key it.

        `kwargs` also holds the dependencies taskiq resolved for the message.
        Raises `BatchArgumentError` naming the task and the offending argument,
        or `ItemValidationError` for an item that is not valid.
        """
        if not kwargs and len(args) == self._plain_arity:
            # Fast path: each argument fills its own parameter, in order; the
            # key is the one the general path computes for the same values.
            if len(args) == 1:
                return BoundItem(
                    self.validate_item(args[0]), (), _EMPTY, _EMPTY, _ITEM_ONLY_KEY
                )
            call_args = tuple(args[1:])
            key = (freeze(call_args), _NO_KWARGS_KEY)
            return BoundItem(
                self.validate_item(args[0]), call_args, _EMPTY, _EMPTY, key
            )
        item, call_args, call_kwargs, injected = self._split(args, kwargs, worker=True)
        key = (freeze(call_args), freeze(call_kwargs))
        item = self.validate_item(item)
        return BoundItem(item, call_args, call_kwargs, injected, key)

    def check(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Check arguments given to ``kiq`` on the producer, like `bind` would.

        Passing an injected dependency is an error here. No group key is
        computed: only the worker groups items.
        """
        if not kwargs and len(args) == self._plain_arity:
            return  # each argument fills its own parameter, in order
        self._split(args, kwargs, worker=False)

    def _split(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        worker: bool,
    ) -> tuple[Any, tuple[Any, ...], dict[str, Any], dict[str, Any]]:
        """Split arguments into the item, the call's extras and the injected."""
        kwargs = dict(kwargs)
        injected: dict[str, Any] = {}
        for name in self.injected:
            if name in kwargs:
                if not worker:
                    raise self._arg_error(
                        f"parameter {name!r} is injected by taskiq on the worker "
                        "(TaskiqDepends); do not pass it"
                    )
                injected[name] = kwargs.pop(name)

        if args:
            item, args = args[0], args[1:]
            if self.item_name in kwargs and self.item_name not in self.positional_only:
                raise self._arg_error(
                    f"got multiple values for the item {self.item_name!r}"
                )
        elif self.item_name in kwargs and self.item_name not in self.positional_only:
            item = kwargs.pop(self.item_name)
        else:
            raise self._arg_error(
                f"missing the item: pass one {self.item_name} element as the "
                "first argument"
            )

        positional = self.positional
        if len(args) > len(positional) and self.var_positional is None:
            raise self._arg_error(
                f"takes {len(positional)} extra positional argument(s) after the "
                f"item but {len(args)} were given"
            )
        values: dict[str, Any] = dict(zip(positional, args, strict=False))
        star_args: tuple[Any, ...] = args[len(positional) :]
        star_kwargs: dict[str, Any] = {}
        for name, value in kwargs.items():
            if name in values:
                raise self._arg_error(f"got multiple values for argument {name!r}")
            if (name in positional and name not in self.positional_only) or (
                name in self.keyword_only
            ):
                values[name] = value
            elif self.var_keyword is not None:
                star_kwargs[name] = value
            else:
                raise self._arg_error(f"got an unexpected keyword argument {name!r}")

        split = self.positional_call
        call_args = [self._value(values, name) for name in positional[:split]]
        call_args.extend(star_args)
        call_kwargs = {
            name: self._value(values, name)
            for name in (*positional[split:], *self.keyword_only)
        }
        call_kwargs.update(star_kwargs)
        return item, tuple(call_args), call_kwargs, injected

    def validate_item(self, value: Any) -> Any:
        """Validate and convert one item; raise `ItemValidationError` if it is bad."""
        adapter = self._item_adapter
        if adapter is None:
            return value
        try:
            return adapter.validate_python(value)
        except ValidationError as exc:
            problems = "; ".join(
                f"{_location(error['loc'])}{error['msg']}" for error in exc.errors()
            )
            raise ItemValidationError(
                message=(
                    f"batch task {self.task_name!r}: item {value!r} for parameter "
                    f"{self.item_name!r} is not a valid "
                    f"{_type_name(self.item_type)}: {problems}"
                ),
            ) from exc

    def _value(self, values: dict[str, Any], name: str) -> Any:
        if name in values:
            return values[name]
        default = self.defaults.get(name, _MISSING)
        if default is _MISSING:
            raise self._arg_error(f"missing required argument {name!r}")
        return default

    def _arg_error(self, problem: str) -> BatchArgumentError:
        return BatchArgumentError(message=f"batch task {self.task_name!r}: {problem}")


def freeze(value: object) -> Hashable:
    """A hashable stand-in for `value` that is equal exactly when values are.

    Types are kept apart (``1``, ``1.0`` and ``True`` do not group together);
    dicts, lists, sets, pydantic models and dataclasses group by value;
    any other unhashable object groups by its ``repr``.
    """
    kind = type(value)
    if value is None or kind is str:
        return value
    if kind is int or kind is float or kind is bool or kind is bytes:
        return (kind, value)
    if kind is tuple or kind is list:
        elements = typing.cast("Iterable[object]", value)
        return (kind, tuple(freeze(element) for element in elements))
    if isinstance(value, dict):
        pairs = typing.cast("Mapping[object, object]", value).items()
        return (kind, frozenset((freeze(k), freeze(v)) for k, v in pairs))
    if isinstance(value, (set, frozenset)):
        elements = typing.cast("Iterable[object]", value)
        return (kind, frozenset(freeze(element) for element in elements))
    if isinstance(value, BaseModel):
        return (kind, freeze(value.model_dump()))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        return (kind, tuple(freeze(getattr(value, field.name)) for field in fields))
    try:
        hash(value)
    except TypeError:
        return (kind, repr(value))
    return (kind, value)


_NO_KWARGS_KEY = freeze({})
"""The key part of a call without keyword arguments."""
_ITEM_ONLY_KEY = (freeze(()), _NO_KWARGS_KEY)
"""The key of a message that holds the item alone."""
_EMPTY: Mapping[str, Any] = types.MappingProxyType({})
"""No keyword arguments (shared, read-only)."""


def _item_type(
    task_name: str,
    func: Callable[..., Any],
    first: inspect.Parameter,
    annotation: Any,
) -> Any:
    """The element type of the first parameter's `list[...]` annotation."""
    if annotation is None:
        return Any
    annotation = _strip_annotated(annotation)
    origin = typing.get_origin(annotation)
    if annotation is list or annotation is typing.List:  # noqa: UP006
        return Any
    if origin is list:
        (element,) = typing.get_args(annotation)
        if isinstance(element, TypeVar):
            return Any
        return element
    raise _config_error(
        task_name,
        f"its first parameter {first.name!r} is annotated {_type_name(annotation)}, "
        "not a list of items",
        f"annotate it as a list, e.g. {first.name}: list[{_type_name(annotation)}], "
        "and send one element per kiq",
    )


def _positional_call(
    task_name: str,
    rest: list[inspect.Parameter],
    injected: tuple[str, ...],
) -> int:
    """Count the extra parameters the call can pass by position.

    An injected parameter is passed by keyword, so extra parameters after it
    must be too; a ``*args`` after one cannot be passed at all.
    """
    count = 0
    for param in rest:
        if param.name in injected:
            if param.kind in _POSITIONAL:
                if any(p.kind is _P.VAR_POSITIONAL for p in rest):
                    raise _config_error(
                        task_name,
                        f"the injected parameter {param.name!r} comes before "
                        "*args, so the call could not pass both",
                        f"make {param.name!r} keyword-only (after *args)",
                    )
                return count
        elif param.kind in _POSITIONAL:
            count += 1
    return count


def _is_injected(param: inspect.Parameter) -> bool:
    if isinstance(param.default, Dependency):
        return True
    return any(
        isinstance(meta, Dependency)
        for meta in getattr(param.annotation, "__metadata__", ())
    )


def _strip_annotated(annotation: Any) -> Any:
    if typing.get_origin(annotation) is typing.Annotated:
        return typing.get_args(annotation)[0]
    return annotation


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and not isinstance(annotation, types.GenericAlias):
        return annotation.__qualname__
    return repr(annotation).replace("typing.", "")


def _location(loc: tuple[int | str, ...]) -> str:
    return f"{'.'.join(map(str, loc))}: " if loc else ""


def _func_name(func: Callable[..., Any]) -> str:
    return getattr(func, "__name__", "batch")


def _config_error(task_name: str, problem: str, fix: str) -> BatchConfigError:
    return BatchConfigError(
        message=f"batch task {task_name!r} cannot batch: {problem}. Fix: {fix}.",
    )
