"""Keyword options checked against the function that takes them: an unknown name gets the closest valid one, a value
of the wrong type gets one error naming the option and its declared type. Methods (fastprompt.build's options) and
datasets (build_dataset's options, the runner's dataset.* keys) share it, so both say the same things the same way.
"""

from __future__ import annotations

import difflib
import inspect
import numbers
import types
import typing


def closest(name: str, valid) -> str | None:
    """The valid name closest to a misspelt `name`, or None when none is close."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return close[0] if close else None


def declared_types(function, skip: int = 0) -> dict[str, object]:
    """Parameter name -> its annotation, resolved (object where undeclared or unresolvable), after `skip` leading
    parameters."""
    names = list(inspect.signature(function).parameters)[skip:]
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # an annotation that cannot be resolved: such options go unchecked
        hints = {}
    return {name: hints.get(name, object) for name in names}


def accepts(hint, value) -> bool | None:
    """Whether `value` is of the declared type (an int is a float, a bool is not an int; numpy scalars count as
    numbers); None where the hint is not a plain type or a union of them, which the callee's own checks then judge."""
    if hint is object or hint is typing.Any:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        verdicts = [accepts(arg, value) for arg in typing.get_args(hint)]
        return True if any(verdicts) else (None if None in verdicts else False)
    if hint is type(None):
        return value is None
    if not isinstance(hint, type) or typing.get_origin(hint) is not None:
        return None
    if isinstance(value, bool) and hint is not bool:
        return False
    if hint is float:  # numpy scalars too: a sweep's values often are
        return isinstance(value, numbers.Real)
    if hint is int:
        return isinstance(value, numbers.Integral)
    return isinstance(value, hint)


def type_name(hint) -> str:
    """'int', 'str | None': the declared type as the user would write it. Unions are spelt out member by member:
    Python 3.10's get_type_hints turns `str | None = None` into typing.Optional[str]."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(type_name(member) for member in typing.get_args(hint))
    if hint is type(None):
        return "None"
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def plain_number(value):
    """numpy and other numbers.Real scalars as Python int/float (schedules and range checks take Python numbers);
    anything else unchanged."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool | int):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, int | float):
        return float(value)
    return value
