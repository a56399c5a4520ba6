"""Host-side helpers for the launchers: integer arithmetic and the device check they share.

triton.cdiv and triton.next_power_of_2 are constexpr functions in Triton 3.x: each call from Python goes through a
wrapper that unwraps constexpr arguments (~10 us of host time here), and the launchers make ~500 such calls per
ViT-B/16 training step. These are the same integer functions in plain Python.
"""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n for n >= 1 (triton.next_power_of_2's values; 0 for n = 0)."""
    return 0 if n == 0 else 1 << (n - 1).bit_length()


def check_same_device(op: str, tensors: dict) -> None:
    """All tensors of `tensors` ({name: tensor}) on one device, else one ValueError naming each one's device."""
    first = None
    for t in tensors.values():  # a plain loop: ~100 calls per training step, each comprehension a Python call
        if first is None:
            first = t.device
        elif t.device != first:
            devices = {name: t.device for name, t in tensors.items()}
            raise ValueError(f"{op}: all tensors must be on one device, got {devices}")
