"""The evaluation engine (fastprompt.evaluation): metrics accumulated on the device against references written
from the definitions in plain Python, EvalStep's CUDA-graph logic falling back cleanly on CPU, and (GPU tier) the
graphed forward equal to the eager one, without a host synchronisation per batch."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import fastprompt
from fastprompt.evaluation import EvalStep, class_counts, default_amp_dtype, evaluate, macro_f1

NAMES = ["red circle", "blue square", "green triangle", "yellow star", "purple cross"]


def reference_macro_f1(pred: list[int], target: list[int]) -> float:
    """From a confusion matrix counted in Python: F1_c = 2 TP / (2 TP + FP + FN), mean over classes that occur."""
    confusion: dict[tuple[int, int], int] = {}
    for p, t in zip(pred, target):
        confusion[(t, p)] = confusion.get((t, p), 0) + 1
    f1s = []
    for c in sorted(set(pred) | set(target)):
        tp = confusion.get((c, c), 0)
        fp = sum(n for (t, p), n in confusion.items() if p == c and t != c)
        fn = sum(n for (t, p), n in confusion.items() if t == c and p != c)
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s)


def test_macro_f1_and_class_counts_match_a_confusion_matrix():
    g = torch.Generator().manual_seed(1)
    for classes, n in ((7, 50), (40, 30), (3, 1)):  # 40 classes in 30 samples: many classes never occur
        pred = torch.randint(0, classes, (n,), generator=g)
        target = torch.randint(0, classes, (n,), generator=g)
        assert math.isclose(macro_f1(pred, target, classes), reference_macro_f1(pred.tolist(), target.tolist()),
                            rel_tol=1e-12)
        tp, predicted, actual = class_counts(pred, target, classes).tolist()
        assert tp == [sum(p == t == c for p, t in zip(pred.tolist(), target.tolist())) for c in range(classes)]
        assert predicted == [pred.tolist().count(c) for c in range(classes)]
        assert actual == [target.tolist().count(c) for c in range(classes)]
    assert macro_f1(torch.tensor([2, 2]), torch.tensor([2, 2]), 4) == 1.0
    assert math.isclose(macro_f1(torch.tensor([1, 1]), torch.tensor([0, 1]), 3), reference_macro_f1([1, 1], [0, 1]))


def _batches(sizes, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g)) for n in sizes]


@pytest.mark.parametrize("method,mode", [("maple", "base"), ("mmrl", "base"), ("mmrl", "novel"), ("cocoop", "base")])
def test_evaluate_equals_a_per_batch_reference(method, mode, tiny_clip):
    model = fastprompt.build(method, tiny_clip, NAMES)
    with torch.no_grad():
        for p in model.method.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    batches = _batches([4, 4, 3], len(NAMES))  # a partial last batch
    preds, targets, losses = [], [], []
    twin = copy.deepcopy(model).eval()
    for x, y in batches:
        with torch.enable_grad():  # the reference never touches the cache
            logits = twin.predict(twin(x), mode).detach().float()
        preds += logits.argmax(-1).tolist()
        targets += y.tolist()
        losses += F.cross_entropy(logits, y, reduction="none").tolist()
    metrics = evaluate(model, batches, "cpu", mode=mode)
    assert metrics["images"] == 11
    assert math.isclose(metrics["accuracy"], 100 * sum(p == t for p, t in zip(preds, targets)) / 11, rel_tol=1e-12)
    assert math.isclose(metrics["macro_f1"], 100 * reference_macro_f1(preds, targets), rel_tol=1e-12)
    assert math.isclose(metrics["loss"], sum(losses) / 11, rel_tol=1e-5)


def test_eval_step_on_cpu_runs_eagerly_and_says_why(tiny_clip):
    model = fastprompt.build("coop", tiny_clip, NAMES)
    step = EvalStep(model)
    assert step.amp_dtype is None and default_amp_dtype("cpu") is None  # CUDA: tests/test_pre_ampere.py
    x, y = _batches([3], len(NAMES))[0]
    logits = step(x, y)
    assert step.mode_name == "eager" and "CUDA graphs need CUDA tensors" in step.graph_reason
    with torch.no_grad():
        torch.testing.assert_close(logits, model.predict(model(x)))
    totals = step.totals()
    assert totals.images == 3 and totals.correct == int((logits.argmax(-1) == y).sum())
    with pytest.raises(RuntimeError, match="cuda_graph=True but CUDA graphs need CUDA tensors"):
        EvalStep(model, cuda_graph=True)(x, y)
    with pytest.raises(ValueError, match="mode must be 'base' or 'novel'"):
        EvalStep(model, mode="all")
    with pytest.raises(ValueError, match="evaluation set is empty"):
        evaluate(model, [], "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["coop", "maple", "mcpl"])
def test_graphed_evaluation_equals_eager_without_a_sync_per_batch(method, tiny_clip):
    clip = fastprompt.patch(copy.deepcopy(tiny_clip).cuda())
    model = fastprompt.build(method, clip, NAMES).cuda()
    batches = [(x.cuda(), y.cuda()) for x, y in _batches([8, 8, 8, 8, 5], len(NAMES))]
    eager, graphed = EvalStep(model, cuda_graph=False), EvalStep(model, cuda_graph=True)
    for i, (x, y) in enumerate(batches):
        expected = eager(x, y)
        if i >= 2 and x.shape[0] == 8:  # warmed up and captured: replays must not synchronise
            torch.cuda.set_sync_debug_mode("error")
        try:
            got = graphed(x, y)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert graphed.mode_name == "cuda_graph"
    a, b = eager.totals(), graphed.totals()
    assert a.images == b.images == 37 and a.correct == b.correct and torch.equal(a.counts, b.counts)
    assert math.isclose(a.loss_sum, b.loss_sum, rel_tol=1e-5)
    # New parameters: the graph read the old cache entry, so the step re-captures and follows them.
    with torch.no_grad():
        for p in model.method.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x, y = batches[0]
    torch.testing.assert_close(graphed(x, y), eager(x, y), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(graphed(x, y), eager(x, y), rtol=1e-5, atol=1e-5)
    assert graphed.mode_name == "cuda_graph"


@pytest.mark.gpu
def test_per_image_text_evaluation_equals_eager_graphed_or_not(tiny_clip):
    """CoCoOp recomputes text per image: whether its forward captures or falls back, the logits are the eager ones."""
    clip = fastprompt.patch(copy.deepcopy(tiny_clip).cuda())
    model = fastprompt.build("cocoop", clip, NAMES).cuda()
    eager, auto = EvalStep(model, cuda_graph=False), EvalStep(model)
    for x, y in [(x.cuda(), y.cuda()) for x, y in _batches([4, 4, 4, 3], len(NAMES))]:
        torch.testing.assert_close(auto(x, y), eager(x, y), rtol=1e-5, atol=1e-5)
    assert auto.mode_name == "cuda_graph" or "capture failed" in (auto.graph_reason or ""), auto.graph_reason
