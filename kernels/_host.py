"""Host-side integer helpers for the launchers.

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
