"""A ``**labels`` keyword of ``batch_task(...)`` that is a misspelled setting."""

from mypy.plugin import FunctionContext

from batchtask_mypy._codes import BATCH_CONFIG

_NOT_SETTINGS = frozenset({"broker", "labels"})
"""``batch_task``'s parameters that are not settings (the runtime's list)."""

_TYPO_EDITS = 2
"""The runtime refuses a label within this many edits of a setting's name."""


def check_misspelled(ctx: FunctionContext) -> None:
    """Report a label the runtime takes for a misspelled setting.

    The settings are ``batch_task``'s own keyword parameters, so the list
    follows its signature; the rule is ``batchtask._config.misspelled_setting``.
    """
    settings = [
        name
        for name in ctx.callee_arg_names
        if name is not None and name not in _NOT_SETTINGS
    ]
    for formal, formal_name in enumerate(ctx.callee_arg_names):
        for name, expr in zip(ctx.arg_names[formal], ctx.args[formal], strict=True):
            if name is None or name == formal_name:
                continue
            setting = _meant(name, settings)
            if setting is None:
                continue
            ctx.api.fail(
                f'batch_task(): keyword "{name}" is not a batch setting; did you '
                f'mean "{setting}"? A taskiq label this close to a setting\'s name '
                f"is refused. Fix: spell it {setting}=",
                expr,
                code=BATCH_CONFIG,
            )


def _meant(label: str, settings: list[str]) -> str | None:
    """The setting `label` is a near miss of, if any."""
    lowered = label.lower()
    for setting in settings:
        if label != setting and _edits(lowered, setting) <= _TYPO_EDITS:
            return setting
    return None


def _edits(a: str, b: str) -> int:
    """Levenshtein distance (names are short)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(
                min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb))
            )
        previous = current
    return previous[-1]
