"""One rank of tests/test_class_shard.py: `python class_shard_worker.py RANK WORLD STORE_FILE`.

Each rank builds, on the same tiny CLIP and with the same seeds, a plain model and a class-sharded one, and
checks the sharded one against the plain one: the plain model runs the GLOBAL batch in this one process, so it is
the single-process expectation the sharded ranks must reproduce (its text path is itself tested against
independent references in test_model_equivalence). Any mismatch raises, so the rank exits non-zero.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import fastprompt
from fastprompt.backbones import create_clip

CLASSES = ["red circle", "blue square", "green triangle", "yellow star", "purple cross", "orange hexagon",
           "white wavy line"]  # 7: an odd count, so the slices differ (4 + 3 over two ranks)
GLOBAL_BATCH = 4
# (method, build options, text_path); 'packed' runs the packed tower with PyTorch ops on the unpatched CLIP.
CASES = [
    ("coop", {"n_ctx": 4}, "reference"),
    ("coop", {"n_ctx": 4, "class_specific": True}, "packed"),  # class-scope context: each rank slices its rows
    ("maple", {}, "packed"),
    ("maple", {}, "reference"),
    ("mcpl", {}, "packed"),  # VAIPL reads every class's input embeddings (and class_state in eval)
    ("mmrl", {}, "packed"),  # insert mode, and a loss that reads the frozen text features
]
# fp32 rounding only: another matmul split and reduction order, on logits scaled by CLIP's 1/0.07.
FP32 = dict(rtol=1e-5, atol=1e-5)


def build_pair(clip, name, options, text_path):
    torch.manual_seed(1)
    plain = fastprompt.build(name, clip, CLASSES, text_path=text_path, **options)
    torch.manual_seed(1)
    sharded = fastprompt.build(name, clip, CLASSES, text_path=text_path, **options)
    sharded.shard_text_classes()
    for a, b in zip(plain.trainable_parameters(), sharded.trainable_parameters()):
        assert torch.equal(a, b), "the two models must start from the same prompts"
    return plain, sharded


def mean_over_ranks(grads, world):
    out = []
    for g in grads:
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        out.append(g / world)
    return out


def check_training(plain, sharded, images, labels, rank, world, what):
    mine = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    plain.train(), sharded.train()
    out = plain(images)
    loss = plain.loss(out, labels)[0]
    params = plain.trainable_parameters()
    expected = torch.autograd.grad(loss, params, allow_unused=True)

    out_s = sharded(images[mine])
    torch.testing.assert_close(out_s.text_features, out.text_features, **FP32,
                               msg=lambda m: f"{what}: text features: {m}")
    for head, logits in out.logits.items():
        torch.testing.assert_close(out_s.logits[head], logits[mine], **FP32,
                                   msg=lambda m: f"{what}: logits {head!r}: {m}")
    loss_s = sharded.loss(out_s, labels[mine])[0]
    params_s = sharded.trainable_parameters()
    grads = torch.autograd.grad(loss_s, params_s, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params_s)]
    grads = mean_over_ranks(grads, world)  # what the data-parallel training step does
    for i, (g, e) in enumerate(zip(grads, expected)):
        e = torch.zeros_like(g) if e is None else e
        # fp32 sums in another order (per-rank halves, then the all_reduce): noise ~1e-6 of the largest entry.
        atol = 1e-5 * float(e.abs().max().clamp(min=1e-3))
        torch.testing.assert_close(g, e, rtol=1e-4, atol=atol, msg=lambda m: f"{what}: parameter {i}: {m}")
    assert any(float(g.abs().max()) > 0 for g in grads), f"{what}: all gradients are zero"


@torch.no_grad()
def check_eval_cache(plain, sharded, images, rank, world, what):
    mine = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    plain.eval(), sharded.eval()
    for step in range(2):
        if step == 1:  # a parameter change must rebuild the cached text on every rank
            for p, q in zip(plain.trainable_parameters(), sharded.trainable_parameters()):
                p.add_(0.01), q.add_(0.01)
        expected = plain(images).logits
        sharded(images[mine])
        entry = sharded.inference_cache()
        sharded.trace = []  # a text pass records its layers; a cached forward records none
        got = sharded(images[mine]).logits
        assert not [t for t in sharded.trace if t[0] == "text"], f"{what}: eval re-ran the text pass"
        assert sharded.inference_cache() is entry, f"{what}: the inference cache was rebuilt"
        sharded.trace = None
        for head, logits in expected.items():
            torch.testing.assert_close(got[head], logits[mine], **FP32,
                                       msg=lambda m: f"{what}: eval logits {head!r}: {m}")


def main(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        clip = create_clip("tiny")
        torch.manual_seed(2)
        images = torch.randn(GLOBAL_BATCH, 3, 32, 32)
        labels = torch.tensor([0, 6, 3, 4])  # classes from both ranks' slices
        for name, options, text_path in CASES:
            what = f"{name} {options} {text_path}"
            plain, sharded = build_pair(clip, name, options, text_path)
            check_training(plain, sharded, images, labels, rank, world, what)
            check_eval_cache(plain, sharded, images, rank, world, what)
            start, stop = sharded.text_sharding.bounds[rank]
            assert sharded.text_sharding.slice_model.classnames == tuple(CLASSES[start:stop]), what
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
