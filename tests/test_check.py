"""``python -m batchtask check``, run as users run it: a subprocess on an app."""

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from batchtask._checks import STOCK_RECEIVER_NOTE

RECEIVER = ("--receiver", "batchtask:BatchReceiver")

BROKER = """\
from taskiq import InMemoryBroker

broker = InMemoryBroker()
"""

TASKS = """\
from batchtask import batch_task

from app.broker import broker


def tokens(doc: str) -> float:
    return float(len(doc))


@batch_task(
    broker,
    batch_size=500,
    batch_timeout=2.0,
    results="per_item",
    bisect_on_error=True,
    weight=tokens,
    max_weight=8000,
)
async def index(docs: list[str]) -> list[int]:
    return [len(doc) for doc in docs]


@batch_task(broker, batch_size=50, batch_timeout=0.5)
async def save(rows: list[int], table: str) -> None:
    pass
"""


@dataclass
class Run:
    status: int
    stdout: str
    stderr: str

    @property
    def text(self) -> str:
        """stdout with the warnings' line wrapping undone."""
        return " ".join(self.stdout.split())


def write(root: Path, files: dict[str, str]) -> None:
    """Write the app package `app` (and its modules) under `root`."""
    (root / "app").mkdir(exist_ok=True)
    (root / "app" / "__init__.py").write_text("")
    for name, source in files.items():
        (root / "app" / f"{name}.py").write_text(textwrap.dedent(source))


def check(root: Path, *args: str, cwd: Path | None = None) -> Run:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(root), *filter(None, [env.get("PYTHONPATH")])]
    )
    done = subprocess.run(
        [sys.executable, "-m", "batchtask", "check", *args],
        cwd=cwd or root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return Run(done.returncode, done.stdout, done.stderr)


def table(run: Run) -> dict[str, list[str]]:
    """The task table: each task's row, split into its columns."""
    lines = run.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["task"])
    rows: dict[str, list[str]] = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        name, size, timeout, others = re.split(r"\s{2,}", line.strip(), maxsplit=3)
        rows[name] = [size, timeout, others]
    return rows


def note(run: Run) -> bool:
    return " ".join(STOCK_RECEIVER_NOTE.split()) in run.text


@pytest.fixture
def app(tmp_path: Path) -> Path:
    write(tmp_path, {"broker": BROKER, "tasks": TASKS})
    return tmp_path


# -- no warning -------------------------------------------------------------


def test_no_warning_exits_0_and_lists_every_task_with_its_settings(
    app: Path,
) -> None:
    run = check(app, "app.broker:broker", "app.tasks", *RECEIVER)

    assert run.status == 0, run
    assert run.stderr == ""
    assert "batchtask check: app.broker:broker (InMemoryBroker)" in run.stdout
    assert (
        "checked as: taskiq worker app.broker:broker app.tasks --receiver "
        "batchtask:BatchReceiver --max-async-tasks 100" in run.stdout
    )
    assert "2 batch tasks:" in run.stdout
    assert table(run) == {
        "app.tasks:index": [
            "500",
            "2 s",
            "results='per_item', bisect_on_error=True, max_weight=8000, "
            "weight=app.tasks.tokens",
        ],
        "app.tasks:save": ["50", "0.5 s", "-"],
    }
    assert "no warnings" in run.stdout
    assert not note(run)


def test_a_broker_factory_function_is_called_as_taskiq_worker_does(
    tmp_path: Path,
) -> None:
    write(
        tmp_path,
        {
            "factory": """\
            from taskiq import InMemoryBroker
            from batchtask import batch_task

            _broker = InMemoryBroker()

            def make_broker():
                return _broker

            @batch_task(_broker, batch_size=5, batch_timeout=1)
            async def save(rows: list[int]) -> None:
                pass
            """
        },
    )
    run = check(tmp_path, "app.factory:make_broker", *RECEIVER)

    assert run.status == 0, run
    assert table(run) == {"app.factory:save": ["5", "1 s", "-"]}


def test_app_dir_is_where_the_app_is_imported_from(
    app: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    env_free = check(
        elsewhere, "app.broker:broker", "app.tasks", *RECEIVER, cwd=elsewhere
    )
    assert env_free.status == 2  # not importable from there
    assert "no module named 'app'" in env_free.stderr

    run = check(
        elsewhere,
        "app.broker:broker",
        "app.tasks",
        "--app-dir",
        str(app),
        *RECEIVER,
        cwd=elsewhere,
    )
    assert run.status == 0, run
    assert set(table(run)) == {"app.tasks:index", "app.tasks:save"}


# -- each warning -----------------------------------------------------------


def test_the_stock_receiver_counts_as_a_warning(app: Path) -> None:
    run = check(app, "app.broker:broker", "app.tasks", "--max-async-tasks", "500")

    assert run.status == 1, run
    assert "--receiver taskiq.receiver:Receiver" in run.stdout  # the default
    assert "1 warning:" in run.stdout
    assert note(run)


def test_max_async_tasks_below_a_batch_size_warns_naming_the_task(
    app: Path,
) -> None:
    run = check(app, "app.broker:broker", "app.tasks")  # taskiq's default: 100

    assert run.status == 1, run
    assert "2 warnings:" in run.stdout
    assert "taskiq worker --max-async-tasks=100 counts every buffered item" in run.text
    assert "app.tasks:index (batch_size=500)" in run.text
    assert "app.tasks:save (batch_size" not in run.text
    assert "or with --max-async-tasks 500 or more" in run.text
    assert note(run)

    lower = check(app, "app.broker:broker", "app.tasks", "--max-async-tasks", "40")
    assert "--max-async-tasks=40" in lower.text
    assert "app.tasks:index (batch_size=500), app.tasks:save (batch_size=50)" in (
        lower.text
    )


def test_the_receiver_lifts_the_max_async_tasks_cap(app: Path) -> None:
    run = check(
        app, "app.broker:broker", "app.tasks", *RECEIVER, "--max-async-tasks", "10"
    )

    assert run.status == 0, run
    assert "--max-async-tasks=" not in run.text


@pytest.mark.parametrize(
    "option",
    [("--max-buffered", "100"), ("--receiver_arg", "max_buffered=100")],
    ids=["--max-buffered", "--receiver_arg"],
)
def test_max_buffered_below_a_batch_size_warns(
    app: Path, option: tuple[str, str]
) -> None:
    run = check(app, "app.broker:broker", "app.tasks", *RECEIVER, *option)

    assert run.status == 1, run
    assert "--receiver_arg max_buffered=100" in run.stdout  # in "checked as"
    assert "1 warning:" in run.stdout
    assert "BatchReceiver(max_buffered=100) holds at most 100" in run.text
    assert "app.tasks:index (batch_size=500)" in run.text
    assert "Fix: --receiver_arg max_buffered=500 or more" in run.text
    assert not note(run)


def test_max_buffered_0_brings_the_max_async_tasks_warning_back(app: Path) -> None:
    """As BatchReceiver does: buffering nothing without a slot lifts no cap."""
    run = check(app, "app.broker:broker", "app.tasks", *RECEIVER, "--max-buffered", "0")

    assert run.status == 1, run
    assert "taskiq worker --max-async-tasks=100 counts every buffered item" in (
        run.text
    )
    assert "BatchReceiver(max_buffered" not in run.text
    assert not note(run)


def test_aio_pika_qos_below_a_batch_size_warns(tmp_path: Path) -> None:
    pytest.importorskip("taskiq_aio_pika")
    write(
        tmp_path,
        {
            "rabbit": """\
            from taskiq_aio_pika import AioPikaBroker
            from batchtask import batch_task

            # Nothing connects: the check only reads the broker's settings.
            broker = AioPikaBroker("amqp://guest:guest@127.0.0.1:1/", qos=10)

            @batch_task(broker, batch_size=50, batch_timeout=1.0)
            async def save(rows: list[int]) -> None:
                pass
            """
        },
    )
    run = check(tmp_path, "app.rabbit:broker", *RECEIVER)

    assert run.status == 1, run
    assert "1 warning:" in run.stdout
    assert "AioPikaBroker(qos=10) lets this worker hold at most 10" in run.text
    assert "app.rabbit:save (batch_size=50)" in run.text
    assert "Fix: AioPikaBroker(..., qos=50) or more" in run.text


def test_a_batch_timeout_past_the_redis_stream_idle_timeout_warns(
    tmp_path: Path,
) -> None:
    pytest.importorskip("taskiq_redis")
    write(
        tmp_path,
        {
            "stream": """\
            from taskiq_redis import RedisStreamBroker
            from batchtask import batch_task

            broker = RedisStreamBroker("redis://127.0.0.1:1", idle_timeout=5000)

            @batch_task(broker, batch_size=10, batch_timeout=10.0)
            async def slow(rows: list[int]) -> None:
                pass

            @batch_task(broker, batch_size=10, batch_timeout=0.5)
            async def quick(rows: list[int]) -> None:
                pass
            """
        },
    )
    run = check(tmp_path, "app.stream:broker", *RECEIVER)

    assert run.status == 1, run
    assert "1 warning:" in run.stdout
    assert "RedisStreamBroker(idle_timeout=5000) redelivers" in run.text
    assert "for 5 s" in run.text
    assert "app.stream:slow (batch_timeout=10)" in run.text
    assert "app.stream:quick (batch_timeout" not in run.text


def test_a_batch_timeout_past_nats_default_ack_wait_warns(tmp_path: Path) -> None:
    pytest.importorskip("taskiq_nats")
    write(
        tmp_path,
        {
            "jetstream": """\
            from taskiq_nats import PullBasedJetStreamBroker
            from batchtask import batch_task

            broker = PullBasedJetStreamBroker(["nats://127.0.0.1:1"])

            @batch_task(broker, batch_size=10, batch_timeout=45)
            async def save(rows: list[int]) -> None:
                pass
            """
        },
    )
    run = check(tmp_path, "app.jetstream:broker", *RECEIVER)

    assert run.status == 1, run
    assert "the NATS consumer's ack_wait=30 redelivers" in run.text
    assert "app.jetstream:save (batch_timeout=45)" in run.text


# -- usage errors -----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "error", "fix"),
    [
        pytest.param(
            ["app.broker"],
            "the broker must be given as module:attribute, got 'app.broker'",
            "e.g. app.tasks:broker",
            id="no-colon",
        ),
        pytest.param(
            ["nowhere:broker"],
            "cannot import the broker's module 'nowhere': no module named 'nowhere'",
            "pass --app-dir DIR",
            id="no-module",
        ),
        pytest.param(
            ["app.broker:brokr", "app.tasks"],
            "module 'app.broker' has no attribute 'brokr'",
            "pass the broker itself, e.g. app.broker:broker",
            id="no-attribute",
        ),
        pytest.param(
            ["app.tasks:index"],
            "app.tasks:index is a BatchTask, not a taskiq broker",
            "pass the broker itself, e.g. app.tasks:broker",
            id="not-a-broker",
        ),
        pytest.param(
            ["app.broker:broker"],
            "no batch task is registered on app.broker:broker",
            "python -m batchtask check app.broker:broker app.tasks",
            id="no-batch-task",
        ),
        pytest.param(
            ["app.broker:broker", "app.taks"],
            "cannot import task module 'app.taks': no module named 'app.taks'",
            "taskiq worker would only log it and run without this module's tasks",
            id="no-task-module",
        ),
        pytest.param(
            ["app.broker:broker", "app.tasks", "--max-buffered", "10"],
            "max_buffered is a BatchReceiver setting, but the receiver is "
            "taskiq.receiver:Receiver",
            "add --receiver batchtask:BatchReceiver",
            id="max-buffered-without-the-receiver",
        ),
        pytest.param(
            ["app.broker:broker", "app.tasks", *RECEIVER, "--receiver_arg", "x=1"],
            "batchtask:BatchReceiver refused its arguments (--receiver_arg x=1): "
            "TypeError:",
            "pass only the --receiver_arg settings the receiver takes",
            id="unknown-receiver-arg",
        ),
        pytest.param(
            ["app.broker:broker", "app.tasks", "--receiver", "batchtask:batch_task"],
            "--receiver batchtask:batch_task is a function, not a taskiq Receiver",
            "e.g. --receiver batchtask:BatchReceiver",
            id="receiver-not-a-receiver",
        ),
    ],
)
def test_a_bad_target_exits_2_naming_the_fix(
    app: Path, args: list[str], error: str, fix: str
) -> None:
    run = check(app, *args)

    assert run.status == 2, run
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert lines[-2].startswith("batchtask check: error: ")
    assert error in lines[-2]
    assert lines[-1].startswith("batchtask check: fix: ")
    assert fix in lines[-1]


def test_an_error_raised_by_the_app_on_import_is_shown_with_its_traceback(
    app: Path,
) -> None:
    write(app, {"broken": "from app.broker import broker\nrows = undefined_name\n"})
    run = check(app, "app.broken:broker")

    assert run.status == 2, run
    assert run.stdout == ""
    assert 'app/broken.py", line 2, in <module>' in run.stderr
    assert "importlib" not in run.stderr  # the app's frames only
    assert (
        "batchtask check: error: importing the broker's module 'app.broken' raised "
        "NameError: name 'undefined_name' is not defined" in run.stderr
    )
    assert "taskiq worker would stop on it too" in run.stderr


def test_a_bad_option_is_a_usage_error(app: Path) -> None:
    run = check(app, "app.broker:broker", "--max-buffered", "lots")

    assert run.status == 2
    assert "argument --max-buffered: expected a whole number >= 0" in run.stderr


def test_help_names_the_options_and_exit_statuses(app: Path) -> None:
    run = check(app, "--help")

    assert run.status == 0
    for option in ("--receiver", "--max-async-tasks", "--receiver_arg"):
        assert option in run.stdout
    assert "--max-buffered" in run.stdout
    assert "exit status: 0 no warning, 1 at least one warning, 2" in run.stdout
