"""Class prompts: template + class names -> token ids, EOT positions and the learnable slots.

A template is a string with one `{}` for the class name, e.g. "a photo of a {}." (MaPLe: its first 2
tokens "a photo" are the learnable slots, initialised from their embeddings) or "X X X X {}." (CoOp:
placeholders). The slots are always the `slots` tokens right after SOS and must come before the class
name, so every class shares them (the shared-prefix property the fast path relies on).

Names are checked rather than silently truncated (open_clip's tokenizer cuts long prompts and forces
EOT at the last position, which would change the class silently).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClassPrompts:
    classnames: tuple[str, ...]
    template: str
    tokens: torch.Tensor  # [C, context_length] int64, zero-padded like open_clip's tokenizer
    eot: torch.Tensor  # [C] index of EOT in each row
    lengths: torch.Tensor  # [C] SOS..EOT inclusive
    slots: int
    prefix_len: int  # tokens before the class name shared by all classes (SOS + template head)

    @property
    def max_length(self) -> int:
        return int(self.lengths.max())


def clean_classname(name: str) -> str:
    return " ".join(name.replace("_", " ").split())


class DuplicateClassNamesWarning(UserWarning):
    """Two class names give the same prompt tokens (see tokenize_classes)."""


def class_list(classnames) -> list[str]:
    """`classnames` checked and read once into a list: any iterable of strings (a generator is read here, once),
    not None, a single string or a mapping."""
    if classnames is None:
        raise TypeError("classnames is None; give a list of class names, e.g. ['cat', 'dog']")
    if isinstance(classnames, str | bytes):
        raise TypeError("classnames must be a list of names, not a single string")
    if isinstance(classnames, dict):
        raise TypeError("classnames is a dict; give a list of names (e.g. list(mapping.values()))")
    try:
        names = list(classnames)
    except TypeError:
        raise TypeError(
            f"classnames must be an iterable of strings, not {type(classnames).__name__}"
        ) from None
    for i, raw in enumerate(names):
        if not isinstance(raw, str):
            raise TypeError(f"class name {i} is {raw!r:.80} of type {type(raw).__name__}, not a string")
    return names


def _warn_duplicates(classnames: list[str], rows: list[list[int]]) -> None:
    """Names whose prompts tokenize alike ('cat' twice; 'red_panda' and 'red panda'; 'Crane' and 'crane', which
    CLIP's lower-casing tokenizer makes one) give identical prompts: the same text features, so every image scores
    them equally and the lower index wins the tie. A warning naming them, not an error, because CLIP's standard
    ImageNet class names (open_clip's and CoOp's) hold such pairs ('missile', 'sunglasses') and the papers' ImageNet
    numbers are measured with them. It points at the caller's line outside fastprompt."""
    first_at: dict[tuple, int] = {}
    duplicates = []
    for i, row in enumerate(rows):
        j = first_at.setdefault(tuple(row), i)
        if j == i:
            continue
        a, b = classnames[j], classnames[i]
        if a == b:
            same = repr(a)
        elif clean_classname(a) == clean_classname(b):
            same = f"{a!r} and {b!r}, both {clean_classname(a)!r} after cleaning"
        else:
            same = f"{a!r} and {b!r}, the same tokens"
        duplicates.append(f"{same} at positions {j} and {i}")
    if duplicates:
        import warnings

        warnings.warn(f"duplicate class names ({'; '.join(duplicates[:5])}{'; ...' if len(duplicates) > 5 else ''}):"
                      " their prompts are identical, so they always score the same and the first wins ties",
                      DuplicateClassNamesWarning, stacklevel=_caller_outside_package())


def _caller_outside_package() -> int:
    """warnings.warn's stacklevel for the innermost frame outside the fastprompt package (build, set_classnames and
    Predictor reach class_list at different depths)."""
    import sys
    from pathlib import Path

    package = str(Path(__file__).resolve().parent)
    frame, level = sys._getframe(1), 1  # level 1: class_list, which calls warnings.warn
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def tokenize_classes(
    tokenizer,
    template: str,
    classnames,
    context_length: int,
    slots: int = 0,
    warn_duplicates: bool = True,
) -> ClassPrompts:
    """Tokenize `template.format(name)` for every class with checks.

    `slots`: learnable tokens right after SOS (replace mode). Tokens inserted by 'insert' mode take no
    positional slot, so they do not count against the context length. `warn_duplicates`: warn about names whose
    prompts tokenize alike (off for class-specific contexts, where each position has a context of its own).
    """
    classnames = class_list(classnames)
    names = [clean_classname(n) for n in classnames]
    if not names:
        raise ValueError("the class list is empty; give at least one class name")
    for raw, name in zip(classnames, names):
        if not name:
            raise ValueError(f"class name {raw!r} is empty after cleaning")
    if template.count("{}") != 1:
        raise ValueError(f"template must contain exactly one '{{}}' for the class name, got {template!r}")

    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    head, _ = template.split("{}")
    head_ids = tokenizer.encode(head) if head.strip() else []
    if slots > len(head_ids):
        raise ValueError(
            f"{slots} learnable slots need {slots} template tokens before the class name, but {template!r} has"
            f" {len(head_ids)}; use a template with enough leading words (e.g. 'X X X X {{}}.')"
        )
    rows = []
    for name in names:
        ids = [sot] + tokenizer.encode(template.format(name)) + [eot]
        if ids[1 : 1 + len(head_ids)] != head_ids:
            raise ValueError(f"template head {head!r} tokenizes differently next to class {name!r}")
        if len(ids) > context_length:
            # The name once, cut if long (a name that does not fit is long), and the budget it has.
            shown = name if len(name) <= 60 else f"{name[:57]}..."
            name_tokens = len(tokenizer.encode(name))
            raise ValueError(
                f"class {shown!r} does not fit: its prompt ({template!r}) is {len(ids)} tokens with SOS/EOT, the"
                f" text context holds {context_length}; the name is {name_tokens} tokens, at most"
                f" {context_length - (len(ids) - name_tokens)} fit"
            )
        rows.append(ids)
    if warn_duplicates:
        _warn_duplicates(classnames, rows)
    tokens = torch.zeros(len(rows), context_length, dtype=torch.long)
    for i, ids in enumerate(rows):
        tokens[i, : len(ids)] = torch.tensor(ids)
    lengths = torch.tensor([len(r) for r in rows])
    return ClassPrompts(
        classnames=tuple(names),
        template=template,
        tokens=tokens,
        eot=lengths - 1,
        lengths=lengths,
        slots=slots,
        prefix_len=1 + len(head_ids),
    )
