"""Warnings of fastprompt's own as one note line each.

A warning raised inside fastprompt (duplicate class names, say) shows in Python's form as two lines that quote the
source line that raised it, or for a console script `sys.exit(main())`: neither tells a user anything. The command
line prints them as 'fastprompt: note: ...' on stderr, and a run as 'note: ...' in its output and log, each distinct
message once (a run builds a model per seed and re-prompts it per target, each time warning about the same names).
Torch-free, so that the command line can use it before it imports anything heavy.
"""

from __future__ import annotations

import contextlib
import warnings


def warnings_as_notes(emit, noted_category=None, own_module_prefix: str | None = None):
    """Within the block, a warning of `noted_category` (a subclass included, and shown every time it is raised, not
    once per source line as Python's default filter would), or of a category defined in a module under
    `own_module_prefix`, goes to `emit(message)` once per distinct message; every other warning keeps Python's
    form (whatever showed warnings before the block). Neither chosen is an error at the call."""
    if noted_category is None and own_module_prefix is None:
        raise ValueError("warnings_as_notes needs noted_category or own_module_prefix")
    return _noting(emit, noted_category, own_module_prefix)


@contextlib.contextmanager
def _noting(emit, noted_category, own_module_prefix):
    noted = set()
    with warnings.catch_warnings():
        if noted_category is not None:
            warnings.simplefilter("always", noted_category)
        show = warnings.showwarning

        def note_once(message, category, filename, lineno, file=None, line=None):
            ours = ((noted_category is not None and issubclass(category, noted_category))
                    or (own_module_prefix is not None and category.__module__.startswith(own_module_prefix)))
            if not ours:
                show(message, category, filename, lineno, file, line)
            elif str(message) not in noted:
                noted.add(str(message))
                emit(str(message))

        warnings.showwarning = note_once
        yield
