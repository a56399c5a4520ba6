"""auto's attention order on CUDA comes from the timings kept in fastprompt.ops.backends (H200, 2026-11-27, commit
e536e88): the figures are restated here from issue 9 / shared/gpu/2026-11-27/timing.log, the order expected from
them is written out by hand, and the memory predictor follows the same per-op choice."""

from __future__ import annotations

import pytest
import torch

from fastprompt.memory import StepOptions, options_for
from fastprompt.ops import backends

# (op, shape prefix, backend) -> (forward µs, forward+backward µs), as the issue quotes them (rounded there)
ISSUE_FIGURES = {
    ("attention", "vision", "triton"): (77, 834), ("attention", "vision", "sdpa"): (29, 441),
    ("attention", "VAIPL", "triton"): (282, 932), ("attention", "VAIPL", "sdpa"): (84, 458),
    ("prefix_varlen_attention", "packed text", "triton"): (141, 1314),
    ("prefix_varlen_attention", "packed text", "sdpa"): (515, 1523),
}


@pytest.fixture(autouse=True)
def _default_orders():
    yield
    for device_type in ("cuda", "cpu"):
        backends.set_backend_order(None, device_type=device_type)


def test_table_holds_the_h200_figures_with_device_date_commit_and_source():
    m = backends.measurement_for("cuda")
    assert (m.device, m.date, m.commit, m.dtype) == ("NVIDIA H200", "2026-11-27", "e536e88", torch.bfloat16)
    assert m.source.endswith("2026-11-27/timing.log")
    for (op, shape, backend), (fwd, both) in ISSUE_FIGURES.items():
        [t] = [t for t in m.timings if t.op == op and t.shape.startswith(shape) and t.backend == backend]
        assert t.forward_us == pytest.approx(fwd, abs=0.5) and t.forward_backward_us == pytest.approx(both, abs=0.5)


def test_cuda_order_is_sdpa_first_for_dense_and_triton_first_for_packed_text():
    # From the figures: dense SDPA 441 + 458 us vs Triton 834 + 932; packed Triton 1314 vs SDPA 1523. xformers
    # was not measured (it did not load), so it comes after the measured ones; eager is the last resort.
    assert backends.get_backend_order("attention", "cuda") == ("sdpa", "triton", "xformers", "eager")
    assert backends.get_backend_order("prefix_varlen_attention", "cuda") == ("triton", "sdpa", "xformers", "eager")
    assert backends.get_backend_order("attention", "cpu") == ("sdpa", "eager")


def test_every_measured_shape_of_an_op_agrees_on_the_winner_forward_and_forward_backward():
    """One order per op is only right while no measured shape of the op prefers another backend, in training
    (forward+backward) or inference (forward); eager is not ranked on time (it saves the probabilities)."""
    m = backends.measurement_for("cuda")
    for op in backends.OPS:
        first = backends.measured_order(op, m)[0]
        for shape in {t.shape for t in m.timings if t.op == op}:
            fused = [t for t in m.timings if t.op == op and t.shape == shape and t.backend != "eager"]
            assert min(fused, key=lambda t: t.forward_backward_us).backend == first, shape
            assert min(fused, key=lambda t: t.forward_us).backend == first, shape


def test_measured_order_ranks_by_summed_forward_backward_then_unmeasured_then_eager():
    T = backends.Timing
    m = backends.Measurement("GPU X", "cuda", "2030-01-01", "abc1234", "somewhere.log", torch.float16, timings=(
        T("attention", "a", "triton", 10, 100), T("attention", "a", "sdpa", 10, 60),
        T("attention", "b", "triton", 10, 100), T("attention", "b", "sdpa", 10, 150),
        T("attention", "a", "eager", 1, 1),  # fastest here, still last
    ))
    # triton 100 + 100 = 200 us, sdpa 60 + 150 = 210 us
    assert backends.measured_order("attention", m) == ("triton", "sdpa", "xformers", "eager")
    assert backends.measured_order("prefix_varlen_attention", m) == ("triton", "xformers", "sdpa", "eager")


def test_explain_backend_quotes_the_measurement_behind_the_order():
    choice = backends.explain_backend("attention", device="cuda", dtype=torch.bfloat16, head_dim=64)
    text = str(choice)
    assert "NVIDIA H200" in text and "2026-11-27" in text and "e536e88" in text
    assert "sdpa 29.3/440.6" in text and "triton 77/834" in text and "xformers not measured" in text
    packed = str(backends.explain_backend("prefix_varlen_attention", device="cuda", dtype=torch.bfloat16,
                                          head_dim=64))
    assert "triton 141.2/1314.4" in packed and "sdpa 515.1/1523.3" in packed
    backends.set_backend_order(["eager", "sdpa"], op="attention", device_type="cuda")
    overridden = backends.explain_backend("attention", device="cuda", dtype=torch.bfloat16, head_dim=64)
    assert overridden.why_order == "set by set_backend_order"


def test_memory_options_follow_the_choice_per_pass():
    cuda = options_for(patched=True, device="cuda")
    assert (cuda.attention, cuda.packed_attention) == ("sdpa", "triton")
    cpu = options_for(patched=True, device="cpu")
    assert (cpu.attention, cpu.packed_attention) == ("sdpa", "sdpa")
    # A changed order changes what the predictor assumes, since both read the same order.
    backends.set_backend_order(["sdpa", "triton", "eager"], op="prefix_varlen_attention", device_type="cuda")
    assert options_for(patched=True, device="cuda").packed_attention == "sdpa"
    # Without an explicit packed backend the packed text runs on the dense one.
    assert StepOptions(attention="eager").packed_attention == "eager"
    with pytest.raises(ValueError, match="prefix_attention"):
        StepOptions(prefix_attention="flash3")
