"""fastprompt.notes.warnings_as_notes: the chosen warnings become one emitted line per distinct message, every other
warning keeps the handler it had."""

import warnings

import pytest

from fastprompt.notes import warnings_as_notes


class _Chosen(UserWarning):
    """A category the tests choose."""


class _ChosenChild(_Chosen):
    """Chosen through its parent."""


def _raise_twice(category, message):
    for _ in range(2):  # one source line: Python's default filter would show it once
        warnings.warn(message, category, stacklevel=1)


def test_chosen_category_once_per_message_others_untouched(recwarn):
    emitted = []
    with warnings_as_notes(emitted.append, noted_category=_Chosen):
        _raise_twice(_Chosen, "a")
        _raise_twice(_ChosenChild, "b")
        _raise_twice(_Chosen, "a")
        warnings.warn("left alone", RuntimeWarning)
    assert emitted == ["a", "b"]
    assert [str(w.message) for w in recwarn.list] == ["left alone"]


def test_categories_of_a_module_prefix():
    emitted, shown = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *rest, **kw: shown.append(str(message))
        with warnings_as_notes(emitted.append, own_module_prefix=_Chosen.__module__):
            warnings.warn("ours", _Chosen)
            warnings.warn("ours", _Chosen)
            warnings.warn("python's", DeprecationWarning)
    assert emitted == ["ours"] and shown == ["python's"]


def test_it_needs_a_choice():
    with pytest.raises(ValueError, match="needs noted_category or own_module_prefix"):
        warnings_as_notes(print)
