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


def tokenize_classes(
    tokenizer,
    template: str,
    classnames,
    context_length: int,
    slots: int = 0,
) -> ClassPrompts:
    """Tokenize `template.format(name)` for every class with checks.

    `slots`: learnable tokens right after SOS (replace mode). Tokens inserted by 'insert' mode take no
    positional slot, so they do not count against the context length.
    """
    if isinstance(classnames, str):
        raise TypeError("classnames must be a list of names, not a single string")
    names = [clean_classname(str(n)) for n in classnames]
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
            raise ValueError(
                f"class {name!r} does not fit: '{template.format(name)}' is {len(ids)} tokens with SOS/EOT, the"
                f" text context holds {context_length}"
            )
        rows.append(ids)
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
