"""``python -m batchtask``: ``check`` and ``reconfigure``.

``check`` prints a worker's start-up warnings without a worker;
``reconfigure`` sends a settings change to every worker process.
"""

import argparse
import asyncio
import dataclasses
import importlib
import inspect
import json
import os
import shlex
import sys
import textwrap
import traceback
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, TextIO

from taskiq import AcknowledgeType, AsyncBroker
from taskiq.cli.worker.args import WorkerArgs
from taskiq.receiver import Receiver

from batchtask import _lifecycle, _notices
from batchtask._config import BatchConfig
from batchtask._errors import BatchConfigError
from batchtask.worker import BatchReceiver

OK = 0
"""Exit status: a worker started this way would log no warning."""
WARNINGS = 1
"""Exit status: it would log at least one (the stock receiver's note counts)."""
USAGE = 2
"""Exit status: the check could not run (bad target, import error, bad option)."""

TASKIQ_RECEIVER: str = WorkerArgs.receiver
"""``taskiq worker``'s receiver when ``--receiver`` is not given."""
TASKIQ_MAX_ASYNC_TASKS: int = WorkerArgs.max_async_tasks
"""``taskiq worker``'s ``--max-async-tasks`` when not given."""

_WIDTH = 88

_DESCRIPTION = """\
Import a taskiq app the way `taskiq worker` does, list its batch tasks with
their settings, and print every warning a worker started with the given
options would log at start (batches capped by --max-async-tasks or
max_buffered, AioPikaBroker's qos, Redis stream / NATS redelivery timers,
and the note of a worker without BatchReceiver), without starting one.

Pass the options your worker is started with: the check assumes taskiq
worker's defaults for the others (taskiq's own receiver, --max-async-tasks
100), so a worker that uses BatchReceiver must say so with --receiver."""

_EPILOG = """\
exit status: 0 no warning, 1 at least one warning, 2 the check could not run
(bad target or option, import error, no batch task on the broker).

example (the worker runs `taskiq worker app.broker:broker app.tasks
--receiver batchtask:BatchReceiver --max-async-tasks 200`):
  python -m batchtask check app.broker:broker app.tasks \\
      --receiver batchtask:BatchReceiver --max-async-tasks 200"""


class UsageError(Exception):
    """The check cannot run: what is wrong and how to fix it."""

    def __init__(self, problem: str, fix: str, details: str = "") -> None:
        """Keep the `problem`, its `fix`, and `details` (a traceback) to show."""
        super().__init__(problem)
        self.problem = problem
        self.fix = fix
        self.details = details


@dataclasses.dataclass(frozen=True)
class Options:
    """How the worker the check stands for is started."""

    target: str
    modules: list[str]
    app_dir: str | None
    receiver: str
    receiver_args: dict[str, str]
    max_async_tasks: int

    def worker_argv(self) -> list[str]:
        """The worker's ``sys.argv`` as taskiq leaves it (``taskiq`` popped)."""
        argv = ["worker", self.target, *self.modules]
        if self.app_dir is not None:
            argv += ["--app-dir", self.app_dir]
        argv += ["--receiver", self.receiver]
        for key, value in self.receiver_args.items():
            argv += ["--receiver_arg", f"{key}={value}"]
        argv += ["--max-async-tasks", str(self.max_async_tasks)]
        return argv


@dataclasses.dataclass(frozen=True)
class Report:
    """What the check found: the tasks, and what the worker would warn about."""

    broker: AsyncBroker
    tasks: dict[str, BatchConfig]
    warnings: list[str]


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run ``python -m batchtask ...`` with `argv`; return the exit status.

    argparse's own messages (``--help``, a bad option) go to ``sys.stdout``
    and ``sys.stderr``; the check's to `stdout` and `stderr`.
    """
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    parser = _parser()
    try:
        parsed = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0), or a usage error (2) on stderr
        return stop.code if isinstance(stop.code, int) else USAGE
    if parsed.command == "reconfigure":
        return _reconfigure(parsed, out, err)
    options = Options(
        target=parsed.target,
        modules=list(parsed.modules),
        app_dir=parsed.app_dir,
        receiver=parsed.receiver,
        receiver_args=_receiver_args(parsed.receiver_arg, parsed.max_buffered),
        max_async_tasks=parsed.max_async_tasks,
    )
    try:
        report = check(options)
    except UsageError as error:
        if error.details:
            err.write(error.details.rstrip("\n") + "\n")
        err.write(f"batchtask check: error: {error.problem}\n")
        err.write(f"batchtask check: fix: {error.fix}\n")
        return USAGE
    out.write(render(options, report))
    return WARNINGS if report.warnings else OK


def check(options: Options) -> Report:
    """Import the app and build its receiver as `options` say; list the warnings.

    The broker and the task modules are imported the way ``taskiq worker``
    imports them, and the receiver is built with the arguments the worker
    gives it (built only: nothing listens, the broker does not start).
    The warnings are those the worker's start-up hook logs
    (`batchtask._lifecycle.start_report`), then the stock receiver's note
    unless batch tasks take `BatchReceiver`'s batch-native path.

    :raises UsageError: when the check cannot run; its message names the fix.
    """
    _add_import_paths(options.app_dir)
    broker = _load_broker(options.target)
    # As taskiq's worker does, before the task modules are imported.
    broker.is_worker_process = True
    for module in options.modules:
        _import(module, f"task module {module!r}", _TASK_MODULE_FAILS)
    if not _lifecycle.batch_tasks(broker):
        example = shlex.join(["python", "-m", "batchtask", "check", options.target])
        raise UsageError(
            f"no batch task is registered on {options.target} once "
            + (
                f"{', '.join(options.modules)} "
                f"{'is' if len(options.modules) == 1 else 'are'} imported"
                if options.modules
                else "its module is imported"
            ),
            "name the modules that define the batch tasks after the broker, as "
            f"for taskiq worker: {example} app.tasks",
        )
    _build_receiver(options, broker)
    found, note = _lifecycle.start_report(broker, options.worker_argv())
    if note is not None:
        found.append(note)
    return Report(broker=broker, tasks=_lifecycle.batch_tasks(broker), warnings=found)


def render(options: Options, report: Report) -> str:
    """The check's output: what was checked, the task table, the warnings."""
    lines = [
        f"batchtask check: {options.target} ({type(report.broker).__name__})",
        f"checked as: {shlex.join(['taskiq', *options.worker_argv()])}",
        "",
        f"{_count(len(report.tasks), 'batch task')}:",
        *_table(report.tasks),
        "",
    ]
    if not report.warnings:
        lines.append("no warnings: a worker started this way logs none at start")
    else:
        lines.append(f"{_count(len(report.warnings), 'warning')}:")
        for warning in report.warnings:
            lines.append(
                textwrap.fill(
                    warning,
                    width=_WIDTH,
                    initial_indent="  - ",
                    subsequent_indent="    ",
                    break_long_words=False,
                    break_on_hyphens=False,
                )
            )
    return "\n".join(lines) + "\n"


def non_default_settings(config: BatchConfig) -> list[str]:
    """``name=value`` for each setting but size and timeout not at its default."""
    shown: list[str] = []
    for field in dataclasses.fields(config):
        if field.name in ("batch_size", "batch_timeout"):
            continue
        value: object = getattr(config, field.name)
        if value == field.default:
            continue
        shown.append(f"{field.name}={_shown(value)}")
    return shown


def _table(tasks: dict[str, BatchConfig]) -> list[str]:
    head = ("task", "batch_size", "batch_timeout", "other settings")
    rows = [
        (
            name,
            str(config.batch_size),
            f"{config.batch_timeout:g} s",
            ", ".join(non_default_settings(config)) or "-",
        )
        for name, config in sorted(tasks.items())
    ]
    widths = [max(len(row[i]) for row in (head, *rows)) for i in range(3)]
    return [
        f"  {row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  "
        f"{row[2]:>{widths[2]}}  {row[3]}".rstrip()
        for row in (head, *rows)
    ]


def _shown(value: object) -> str:
    if callable(value):
        module = getattr(value, "__module__", None)
        name = getattr(value, "__qualname__", None) or repr(value)
        return f"{module}.{name}" if module else str(name)
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _build_receiver(options: Options, broker: AsyncBroker) -> Receiver:
    """The receiver, built with the arguments ``taskiq worker`` gives it."""
    receiver_type = _load_receiver(options.receiver)
    # Strings, as taskiq's --receiver_arg passes them.
    kwargs: dict[str, Any] = dict(options.receiver_args)
    if "max_buffered" in kwargs and not issubclass(receiver_type, BatchReceiver):
        raise UsageError(
            f"max_buffered is a BatchReceiver setting, but the receiver is "
            f"{options.receiver}",
            "add --receiver batchtask:BatchReceiver, or drop --max-buffered "
            "(--receiver_arg max_buffered=N)",
        )
    try:
        return receiver_type(
            broker=broker,
            executor=None,
            validate_params=True,
            max_async_tasks=options.max_async_tasks,
            max_async_tasks_jitter=0,
            max_prefetch=0,
            propagate_exceptions=True,
            ack_type=AcknowledgeType.WHEN_SAVED,
            max_tasks_to_execute=None,
            wait_tasks_timeout=None,
            **kwargs,
        )
    except Exception as error:
        args = " ".join(f"--receiver_arg {k}={v}" for k, v in kwargs.items())
        raise UsageError(
            f"{options.receiver} refused its arguments"
            + (f" ({args})" if args else "")
            + f": {type(error).__name__}: {error}",
            "pass only the --receiver_arg settings the receiver takes, with "
            "valid values (the worker would stop on the same error)",
        ) from error


def _load_receiver(spec: str) -> type[Receiver]:
    found = _load_object(spec, "--receiver")
    described = _described(found)
    if isinstance(found, type) and issubclass(found, Receiver):
        return found
    raise UsageError(
        f"--receiver {spec} is {described}, not a taskiq Receiver class",
        "pass the receiver your worker uses, e.g. --receiver "
        "batchtask:BatchReceiver (taskiq's own: taskiq.receiver:Receiver)",
    )


def _load_broker(target: str) -> AsyncBroker:
    """The broker `target` names, called first if it is a function (as taskiq)."""
    found = _load_object(target, "the broker")
    if inspect.isfunction(found):
        factory: Callable[[], object] = found
        try:
            found = factory()
        except Exception as error:
            raise UsageError(
                f"{target} is a function, and calling it (as taskiq worker does "
                f"for a broker factory) raised {type(error).__name__}: {error}",
                f"fix the error in the traceback above; {_WORKER_STOPS}",
                details=_traceback(error),
            ) from error
    if not isinstance(found, AsyncBroker):
        module = target.partition(":")[0]
        brokers = _brokers_in(sys.modules[module])
        raise UsageError(
            f"{target} is {_described(found)}, not a taskiq broker (an AsyncBroker "
            "or a function returning one)",
            _broker_fix(module, brokers),
        )
    return found


def _load_object(spec: str, role: str) -> object:
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute or ":" in attribute:
        raise UsageError(
            f"{role} must be given as module:attribute, got {spec!r}",
            "write it as for taskiq worker, e.g. app.tasks:broker "
            "(or batchtask:BatchReceiver for --receiver)",
        )
    module = _import(module_name, f"{role}'s module {module_name!r}", _WORKER_STOPS)
    try:
        return getattr(module, attribute)
    except AttributeError:
        pass
    brokers = _brokers_in(module) if role == "the broker" else []
    raise UsageError(
        f"module {module_name!r} has no attribute {attribute!r}",
        _broker_fix(module_name, brokers)
        if role == "the broker"
        else f"check the spelling of {spec!r}",
    )


def _broker_fix(module: str, brokers: list[str]) -> str:
    if brokers:
        names = " or ".join(f"{module}:{name}" for name in brokers)
        return f"pass the broker itself, e.g. {names}"
    return (
        f"module {module!r} defines no broker; pass module:attribute of the "
        "broker the batch tasks are registered with (as for taskiq worker)"
    )


def _brokers_in(module: ModuleType) -> list[str]:
    return sorted(
        name
        for name, value in vars(module).items()
        if isinstance(value, AsyncBroker) and not name.startswith("__")
    )


_WORKER_STOPS = "taskiq worker would stop on it too"
_TASK_MODULE_FAILS = (
    "taskiq worker would only log it and run without this module's tasks"
)


def _import(name: str, role: str, consequence: str) -> ModuleType:
    """Import module `name`; `consequence`: what the worker would do if it fails."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if name == missing or name.startswith(missing + "."):
            raise UsageError(
                f"cannot import {role}: no module named {missing!r} (looked in "
                f"the current directory {os.getcwd()!r} and sys.path)",
                "run the check from the directory the worker runs from, pass "
                "--app-dir DIR, or install your project (pip install -e .); "
                f"check the module's spelling ({consequence})",
            ) from error
        raise _raised_on_import(role, error, consequence) from error
    except Exception as error:
        raise _raised_on_import(role, error, consequence) from error


def _raised_on_import(role: str, error: Exception, consequence: str) -> UsageError:
    return UsageError(
        f"importing {role} raised {type(error).__name__}: {error}",
        f"fix the error in the traceback above; {consequence}",
        details=_traceback(error),
    )


def _traceback(error: BaseException) -> str:
    """`error`'s traceback without the frames of this module and importlib."""
    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if frame.filename != __file__
        and not frame.filename.startswith("<frozen ")
        and not frame.filename.endswith(os.path.join("importlib", "__init__.py"))
    ]
    return "".join(
        [
            "Traceback (most recent call last):\n",
            *traceback.format_list(frames),
            *traceback.format_exception_only(error),
        ]
    )


def _described(value: object) -> str:
    if isinstance(value, type):
        return f"the class {value.__module__}.{value.__qualname__}"
    kind = type(value).__name__
    return f"{'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}"


def _add_import_paths(app_dir: str | None) -> None:
    """As ``taskiq worker``: the current directory, and `app_dir` first."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    if app_dir:
        sys.path.insert(0, app_dir)


def _receiver_args(
    pairs: list[tuple[str, str]], max_buffered: int | None
) -> dict[str, str]:
    arguments = dict(pairs)
    if max_buffered is not None:
        arguments["max_buffered"] = str(max_buffered)
    return arguments


def _key_value(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE, e.g. max_buffered=1000, got {text!r}"
        )
    return key, value


def _whole_number(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return number


def _reconfigure(parsed: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``python -m batchtask reconfigure``: send one change to every worker."""
    try:
        _add_import_paths(parsed.app_dir)
        broker = _load_broker(parsed.target)
        for module in parsed.modules:
            _import(module, f"task module {module!r}", _TASK_MODULE_FAILS)
        changes = dict(_setting(text) for text in parsed.changes)
        config = _lifecycle.batch_tasks(broker).get(parsed.task)
        if config is not None:
            try:
                config.changed(parsed.task, changes)
            except BatchConfigError as error:
                raise UsageError(str(error), "send a valid value") from error
        try:
            listening = asyncio.run(
                _notices.publish(broker, _notices.encode(parsed.task, changes))
            )
        except (RuntimeError, TypeError) as error:
            raise UsageError(str(error), "see docs/fleets.md") from error
        except Exception as error:
            raise UsageError(
                f"sending the change failed: {type(error).__name__}: {error}",
                "check that the broker's server answers",
            ) from error
    except UsageError as error:
        err.write(f"batchtask reconfigure: error: {error.problem}\n")
        err.write(f"batchtask reconfigure: fix: {error.fix}\n")
        return USAGE
    checked = "" if config is not None else " (not checked here: no such task known)"
    out.write(
        f"sent {parsed.task}: {changes!r}{checked} to {listening} listening "
        f"worker process(es)\n"
    )
    return OK


def _setting(text: str) -> tuple[str, object]:
    """``key=value``; the value as JSON (``3``, ``0.5``, ``true``, ``null``)."""
    key, _, raw = text.partition("=")
    if not key or not _:
        raise UsageError(
            f"a change must be given as key=value, got {text!r}",
            "pass e.g. batch_size=200 or debounce=null",
        )
    spelled = {"True": "true", "False": "false", "None": "null"}.get(raw, raw)
    try:
        value: object = json.loads(spelled)
    except ValueError:
        value = raw
    return key, value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m batchtask",
        description="batchtask's command line.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    check = commands.add_parser(
        "check",
        help="list a broker's batch tasks and the warnings its worker would log",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument(
        "target",
        metavar="module:broker",
        help="the broker, as for taskiq worker: e.g. app.tasks:broker (a "
        "function returning a broker is called)",
    )
    check.add_argument(
        "modules",
        nargs="*",
        metavar="module",
        help="modules to import after the broker's, as for taskiq worker: "
        "those that define the batch tasks",
    )
    check.add_argument(
        "--app-dir",
        "-d",
        default=None,
        metavar="DIR",
        help="directory to import the app from, as taskiq worker's --app-dir "
        "(default: the current directory)",
    )
    check.add_argument(
        "--receiver",
        default=TASKIQ_RECEIVER,
        metavar="module:Class",
        help="the worker's --receiver (default: taskiq's own, %(default)s; "
        "pass batchtask:BatchReceiver if the worker uses it)",
    )
    check.add_argument(
        "--max-async-tasks",
        type=int,
        default=TASKIQ_MAX_ASYNC_TASKS,
        metavar="N",
        help="the worker's --max-async-tasks (default: taskiq's, %(default)s; "
        "0 or less: no limit)",
    )
    check.add_argument(
        "--receiver_arg",
        "--receiver-arg",
        dest="receiver_arg",
        action="append",
        type=_key_value,
        default=[],
        metavar="KEY=VALUE",
        help="the worker's --receiver_arg, repeatable (e.g. max_buffered=5000, "
        "group_writes=false)",
    )
    reconfigure = commands.add_parser(
        "reconfigure",
        help="change a batch task's settings in every worker process of a broker",
        description=(
            "Send a settings change (as BatchTask.reconfigure takes it) to every "
            "worker process following the broker's notices (the Redis stream "
            "brokers, RabbitMQ and NATS); each applies it within about a second."
        ),
        epilog="example: python -m batchtask reconfigure app.tasks:broker "
        "app.tasks:save batch_size=200 debounce=null",
    )
    reconfigure.add_argument("target", metavar="module:broker", help="the broker")
    reconfigure.add_argument("task", metavar="TASK", help="the batch task's name")
    reconfigure.add_argument(
        "changes", nargs="+", metavar="KEY=VALUE", help="settings, values as JSON"
    )
    reconfigure.add_argument(
        "--import",
        dest="modules",
        action="append",
        default=[],
        metavar="module",
        help="a module defining the task, imported to check the change first",
    )
    reconfigure.add_argument(
        "--app-dir", "-d", default=None, metavar="DIR", help="as taskiq worker's"
    )
    check.add_argument(
        "--max-buffered",
        type=_whole_number,
        default=None,
        metavar="N",
        help="short for --receiver_arg max_buffered=N (BatchReceiver's; default 10000)",
    )
    return parser
