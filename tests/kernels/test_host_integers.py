"""The launchers' plain-Python cdiv and next_power_of_2 (kernels/_host.py) give Triton's values."""

import triton

from fastprompt.kernels._host import cdiv, next_power_of_2


def test_cdiv_equals_triton():
    for a in range(0, 300):
        for b in (1, 2, 3, 16, 32, 64, 128, 512):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)


def test_next_power_of_2_equals_triton():
    for n in range(0, 5000):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
