"""Point 1: settings and functions are checked when the decorator runs."""

import math
from typing import Any

import pytest
from taskiq import InMemoryBroker, TaskiqDepends
from taskiq.exceptions import TaskiqError

from batchtask import BatchConfigError, batch_task


async def _noop(items: list[int]) -> None:
    return None


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "10", None])
def test_bad_batch_size_is_rejected_naming_the_field_value_and_fix(value: Any) -> None:
    with pytest.raises(BatchConfigError) as raised:
        batch_task(InMemoryBroker(), batch_size=value, batch_timeout=1.0)
    message = str(raised.value)
    assert f"batch_size={value!r}" in message
    assert "int >= 1" in message
    assert "Fix: pass e.g. batch_size=100" in message


@pytest.mark.parametrize("value", [0, -0.5, math.inf, math.nan, None, "2", False])
def test_bad_batch_timeout_is_rejected_naming_the_field_value_and_fix(
    value: Any,
) -> None:
    with pytest.raises(BatchConfigError) as raised:
        batch_task(InMemoryBroker(), batch_size=10, batch_timeout=value)
    message = str(raised.value)
    assert f"batch_timeout={value!r}" in message
    assert "finite number of seconds > 0" in message
    assert "Fix: pass e.g. batch_timeout=2.0" in message


def test_batch_timeout_is_required() -> None:
    with pytest.raises(TypeError, match="batch_timeout"):
        batch_task(InMemoryBroker(), batch_size=10)  # type: ignore[call-overload]  # the missing argument is the point


def test_bad_results_mode_is_rejected() -> None:
    with pytest.raises(BatchConfigError, match=r"results='each'.*'shared', 'per_item'"):
        batch_task(InMemoryBroker(), batch_size=10, batch_timeout=1, results="each")  # type: ignore[call-overload]  # the bad literal is the point


def test_bad_bisect_flag_is_rejected() -> None:
    with pytest.raises(BatchConfigError, match="bisect_on_error='yes'"):
        batch_task(
            InMemoryBroker(), batch_size=1, batch_timeout=1, bisect_on_error="yes"
        )  # type: ignore[arg-type]  # the bad value is the point


def test_config_error_is_a_taskiq_error_and_names_the_task() -> None:
    with pytest.raises(TaskiqError, match="batch task 'jobs:save'"):
        batch_task(
            InMemoryBroker(), batch_size=0, batch_timeout=1, task_name="jobs:save"
        )


def test_function_without_parameters_is_rejected() -> None:
    def nothing() -> None: ...

    with pytest.raises(
        BatchConfigError,
        match=r"no positional first parameter.*Fix: declare the items first",
    ):
        batch_task(InMemoryBroker(), batch_size=2, batch_timeout=1)(nothing)  # type: ignore[call-overload]  # the missing list is the point


def test_first_parameter_not_a_list_is_rejected_with_the_fix() -> None:
    def scalar(item: int, table: str) -> None: ...

    with pytest.raises(BatchConfigError) as raised:
        batch_task(InMemoryBroker(), batch_size=2, batch_timeout=1)(scalar)  # type: ignore[call-overload]  # the scalar is the point
    message = str(raised.value)
    assert "first parameter 'item' is annotated int, not a list of items" in message
    assert "item: list[int]" in message


@pytest.mark.parametrize("signature", ["*items", "*, items"])
def test_first_parameter_that_is_not_positional_is_rejected(signature: str) -> None:
    namespace: dict[str, Any] = {"__name__": __name__}
    exec(f"def f({signature}): ...", namespace)
    with pytest.raises(BatchConfigError, match="no positional first parameter"):
        batch_task(InMemoryBroker(), batch_size=2, batch_timeout=1)(namespace["f"])


def test_injected_parameter_before_star_args_is_rejected() -> None:
    def odd(
        items: list[int], dep: int = TaskiqDepends(lambda: 1), *rest: int
    ) -> None: ...

    with pytest.raises(
        BatchConfigError, match="injected parameter 'dep' comes before \\*args"
    ):
        batch_task(InMemoryBroker(), batch_size=2, batch_timeout=1)(odd)


@pytest.mark.parametrize("annotation", ["list[int]", "list", "'list[str]'", None])
def test_list_or_unannotated_first_parameter_is_accepted(
    annotation: str | None,
) -> None:
    namespace: dict[str, Any] = {"__name__": __name__}
    header = f"items: {annotation}" if annotation else "items"
    exec(f"async def f({header}, table: str): return None", namespace)
    task = batch_task(InMemoryBroker(), batch_size=2, batch_timeout=1)(namespace["f"])
    assert task.config.batch_size == 2
    assert task.config.batch_timeout == 1.0
