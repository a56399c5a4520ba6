"""The per-run prompt splice schedule (METHODS.md §1.1).

For each tower and each layer l, before layer l runs, the prompt segment is edited by
(drop r_l, add a_l): the last r_l segment tokens are removed (their layer l-1 outputs are discarded),
a_l new tokens are appended at the end of the segment, the rest is carried. After the last edited
layer the segment is carried to the end. The schedule is validated once and is immutable, so the
eager reference and the fast path read the same object.

Vision segment site: 'tail' (after the patches) or 'head' (right after CLS). Text segment mode:
'replace' (the segment is n placeholder slots 1..n of the template; layer 1 fills them before the
positional embedding, deeper layers replace them; the length stays the template's) or 'insert'
(tokens inserted after SOS grow the sequence; they get no positional embedding; the EOT index shifts).
"""

from __future__ import annotations

from dataclasses import dataclass


class ScheduleError(ValueError):
    """A splice schedule that cannot be applied."""


@dataclass(frozen=True)
class LayerEdit:
    drop: int = 0
    add: int = 0

    def __post_init__(self):
        for name in ("drop", "add"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ScheduleError(f"LayerEdit.{name} must be a non-negative int, got {value!r}")


@dataclass(frozen=True)
class TowerSchedule:
    """Edits for every layer of one tower; `edits[l]` runs before layer l (0-based)."""

    tower: str  # 'vision' or 'text'
    edits: tuple[LayerEdit, ...]
    site: str = "tail"  # vision: 'tail' | 'head'; text: always right after SOS
    mode: str = "replace"  # text: 'replace' | 'insert'; ignored for vision

    def __post_init__(self):
        if self.tower not in ("vision", "text"):
            raise ScheduleError(f"tower must be 'vision' or 'text', got {self.tower!r}")
        if self.tower == "vision" and self.site not in ("tail", "head"):
            raise ScheduleError(f"vision site must be 'tail' or 'head', got {self.site!r}")
        if self.tower == "text" and self.mode not in ("replace", "insert"):
            raise ScheduleError(f"text mode must be 'replace' or 'insert', got {self.mode!r}")
        object.__setattr__(self, "edits", tuple(self.edits))
        length = 0
        for layer, edit in enumerate(self.edits):
            if edit.drop > length:
                raise ScheduleError(
                    f"{self.tower} layer {layer + 1}: drops {edit.drop} tokens but the segment holds only {length}"
                )
            length += edit.add - edit.drop
        if self.tower == "text" and self.mode == "replace" and self.prompted:
            slots = self.edits[0].add
            if slots == 0 or self.edits[0].drop:
                raise ScheduleError(
                    "text 'replace' mode: layer 1 must fill the template's placeholder slots (add n > 0, drop 0)"
                )
            for layer, edit in enumerate(self.edits[1:], start=2):
                if edit.drop != edit.add:
                    raise ScheduleError(
                        f"text 'replace' mode keeps the template length: layer {layer} drops {edit.drop} but adds"
                        f" {edit.add}; use mode='insert' to change the text length"
                    )

    @classmethod
    def none(cls, tower: str, layers: int, **kw) -> "TowerSchedule":
        return cls(tower, tuple(LayerEdit() for _ in range(layers)), **kw)

    @classmethod
    def deep(cls, tower: str, layers: int, n: int, depth: int, first: int = 1, **kw) -> "TowerSchedule":
        """n tokens added at layer `first`, replaced (drop n, add n) in layers first+1..depth, carried after.
        The MaPLe / IVLP / VPT rule (first=1) and MMRL's (first=6, depth=12)."""
        if not 1 <= first <= depth <= layers:
            raise ScheduleError(f"need 1 <= first ({first}) <= depth ({depth}) <= layers ({layers})")
        edits = []
        for layer in range(1, layers + 1):
            if layer == first:
                edits.append(LayerEdit(0, n))
            elif first < layer <= depth:
                edits.append(LayerEdit(n, n))
            else:
                edits.append(LayerEdit())
        return cls(tower, tuple(edits), **kw)

    @property
    def layers(self) -> int:
        return len(self.edits)

    @property
    def prompted(self) -> bool:
        return any(e.add or e.drop for e in self.edits)

    @property
    def first_prompted_layer(self) -> int | None:
        """1-based index of the first layer with an edit, None when the tower carries no prompts."""
        for layer, edit in enumerate(self.edits, start=1):
            if edit.add or edit.drop:
                return layer
        return None

    def segment_lengths(self) -> list[int]:
        """Segment length seen by each layer (after its edit)."""
        out, length = [], 0
        for edit in self.edits:
            length += edit.add - edit.drop
            out.append(length)
        return out

    @property
    def final_segment(self) -> int:
        lengths = self.segment_lengths()
        return lengths[-1] if lengths else 0

    def sequence_lengths(self, base_tokens: int) -> list[int]:
        """Tokens each layer processes. Text 'replace' segments sit inside the template (length constant)."""
        if self.tower == "text" and self.mode == "replace":
            return [base_tokens] * self.layers
        return [base_tokens + s for s in self.segment_lengths()]

    def adds(self) -> list[int]:
        return [e.add for e in self.edits]

    def check_layers(self, layers: int) -> None:
        if self.layers != layers:
            raise ScheduleError(f"{self.tower} schedule has {self.layers} layers, the model's tower has {layers}")
