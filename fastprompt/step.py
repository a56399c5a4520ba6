"""One training step (forward, loss, backward, optimizer step) as a callable, and the benchmark's contenders.

    step = TrainStep(model, optimizer, amp_dtype=torch.bfloat16)   # cuda_graph="auto"
    for images, labels in loader:
        loss = step(images, labels)                                  # a 0-dim tensor on the device, not synced

On CUDA with static shapes the step is captured once in a CUDA graph and replayed: at the papers' batch size 4
the step is a few hundred small kernels, and launching them costs more CPU time than the GPU needs
(PERFORMANCE.md §1.4). The recipe is PyTorch's whole-network capture: `warmup_steps` real steps run eagerly on a
side stream (lazy initialisation, optimizer state), then the next step is captured with static input buffers
and replayed; every later step copies its batch into the buffers and replays. Optimizers with a `capturable`
flag (Adam, AdamW) get it set, and hyperparameters read on the host (a float learning rate) are baked into the
graph, so the step re-captures when they change (once per epoch under the papers' schedules).

What falls back to eager, logged once with the reason (and kept in `graph_reason`): CPU tensors, a batch whose
shape or dtype differs from the captured one (only that step runs eagerly, e.g. a smaller last batch), and a
capture that fails (a host synchronisation inside the model, an op that cannot be captured): then every later
step runs eagerly. `cuda_graph=True` turns these into errors instead.

`compile=True` runs the whole step through torch.compile instead (the benchmark's 'compiled' contender; graph
capture is then torch.compile's business: mode="reduce-overhead").

`skip_nonfinite=True` makes a step with a NaN/inf loss a no-op for the parameters and optimizer state without a
host synchronisation (so it works inside a graph); `skipped_steps` counts them.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


def prompted_loss(model, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss of a PromptedCLIP: its forward, then the method's loss."""
    out = model(images)
    loss, _ = model.loss(out, labels)
    return loss


def _graph_problem(images: torch.Tensor) -> str | None:
    """Why this batch cannot use a CUDA graph (None when it can)."""
    if images.device.type != "cuda":
        return f"CUDA graphs need CUDA tensors; the batch is on {images.device}"
    return None


def _side_stream(device: torch.device):
    """A context running work on a fresh side stream that joins back to the current one (CUDA only)."""
    if device.type != "cuda":
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def run():
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            yield
        current.wait_stream(side)

    return run()


def _signature(images: torch.Tensor, labels: torch.Tensor) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.device) for t in (images, labels))


def _hyperparameters(optimizer) -> tuple:
    """The optimizer settings a captured graph has baked in (host-side numbers, not tensors)."""
    plain = (bool, int, float, str, type(None), tuple)
    return tuple(
        tuple(sorted((k, v) for k, v in group.items() if k != "params" and isinstance(v, plain)))
        for group in optimizer.param_groups
    )


class TrainStep:
    """forward + loss + backward + optimizer step; see the module docstring.

    Args:
        model: a PromptedCLIP, or any module `loss_fn` understands.
        optimizer: over the trainable parameters.
        loss_fn: (model, images, labels) -> scalar loss; default `prompted_loss`.
        amp_dtype: autocast dtype (torch.bfloat16 / torch.float16) or None for none.
        cuda_graph: 'auto' (capture on CUDA, fall back with a logged reason), True (capture or raise), False.
        compile: run the step through torch.compile (excludes cuda_graph=True); `compile_options` are passed on.
        warmup_steps: eager steps before the capture (at least 1).
        skip_nonfinite: skip steps whose loss is not finite without a host synchronisation.
    """

    def __init__(self, model, optimizer, *, loss_fn=prompted_loss, amp_dtype: torch.dtype | None = None,
                 cuda_graph: bool | str = "auto", compile: bool = False, compile_options: dict | None = None,
                 warmup_steps: int = 3, skip_nonfinite: bool = False):
        if cuda_graph not in ("auto", True, False):
            raise ValueError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
        if compile and cuda_graph is True:
            raise ValueError("compile=True with cuda_graph=True: use compile_options={'mode': 'reduce-overhead'}"
                             " for CUDA graphs of compiled code")
        if amp_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"amp_dtype must be torch.bfloat16, torch.float16 or None, got {amp_dtype!r}")
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an int >= 1, got {warmup_steps!r}")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.amp_dtype = amp_dtype
        self.cuda_graph = False if compile else cuda_graph
        self.warmup_steps = warmup_steps
        self.skip_nonfinite = skip_nonfinite
        self.graph_reason: str | None = "compile=True" if compile else None
        self.steps = 0
        self._compiled = torch.compile(self._eager_step, **(compile_options or {})) if compile else None
        self._graph = None
        self._graph_failed = False
        self._signature = None  # shapes the graph was captured for
        self._hyper = None
        self._warm = 0
        self._static: tuple | None = None
        self._logged: set[str] = set()
        self._skipped: torch.Tensor | None = None

    # --- public ---------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """'cuda_graph' once captured, 'compiled' with compile=True, else 'eager'."""
        if self._graph is not None:
            return "cuda_graph"
        return "compiled" if self._compiled is not None else "eager"

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite loss (reads a device counter: synchronises)."""
        return 0 if self._skipped is None else int(self._skipped)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        if self.skip_nonfinite and self._skipped is None:  # created outside any capture: replays only add to it
            self._skipped = torch.zeros((), dtype=torch.int64, device=images.device)
        if self.cuda_graph is False or self._graph_failed:
            return self._run(images, labels)
        problem = _graph_problem(images)
        if problem is not None:
            return self._no_graph(problem, images, labels)
        signature = _signature(images, labels)
        if self._signature is not None and signature != self._signature:
            shapes = ", ".join(str(s[0]) for s in signature)
            return self._no_graph(f"batch shapes {shapes} differ from the captured "
                                  f"{', '.join(str(s[0]) for s in self._signature)}; such steps run eagerly",
                                  images, labels, permanent=False)
        if self._graph is not None and _hyperparameters(self.optimizer) != self._hyper:
            logger.info("TrainStep: optimizer hyperparameters changed; re-capturing the CUDA graph")
            self._graph = None
        if self._graph is None:
            if self._warm < self.warmup_steps:
                self._warm += 1
                if self._warm == 1:
                    self._make_capturable()
                with _side_stream(images.device):
                    return self._run(images, labels)
            try:
                self._capture(images, labels)
            except Exception as error:  # noqa: BLE001 - any capture failure means: run eagerly
                self._graph = None
                self._graph_failed = True
                self.graph_reason = f"CUDA graph capture failed: {type(error).__name__}: {error}"
                if self.cuda_graph is True:
                    raise RuntimeError(self.graph_reason) from error
                logger.warning("TrainStep: %s; running eagerly", self.graph_reason)
                if images.device.type == "cuda":
                    torch.cuda.synchronize(images.device)  # surfaces a broken context here, not later
                return self._run(images, labels)
            self._signature = signature
            self.graph_reason = None
        static_images, static_labels, static_loss = self._static
        static_images.copy_(images)
        static_labels.copy_(labels)
        self._graph.replay()
        return static_loss.clone()

    # --- the step -------------------------------------------------------------------------------------
    def _body(self, images, labels) -> torch.Tensor:
        """forward, loss, backward, optimizer step (gradients must be None on entry)."""
        with torch.autocast(images.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            loss = self.loss_fn(self.model, images, labels)
        loss.backward()
        if self.skip_nonfinite:
            self._guarded_update(torch.isfinite(loss.detach()))
        else:
            self.optimizer.step()
        return loss.detach()

    def _eager_step(self, images, labels) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        return self._body(images, labels)

    def _run(self, images, labels) -> torch.Tensor:
        return (self._compiled or self._eager_step)(images, labels)

    def _no_graph(self, reason: str, images, labels, permanent: bool = True):
        if self.cuda_graph is True:
            raise RuntimeError(f"cuda_graph=True but {reason}")
        if permanent:
            self.graph_reason = reason
        if reason not in self._logged:
            self._logged.add(reason)
            logger.info("TrainStep: no CUDA graph: %s", reason)
        return self._run(images, labels)

    # --- non-finite losses ----------------------------------------------------------------------------
    def _state_tensors(self) -> dict:
        out = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                out[(id(p), "param")] = p
                for key, value in self.optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value):
                        out[(id(p), key)] = value
        return out

    def _guarded_update(self, finite: torch.Tensor) -> None:
        """optimizer.step(), then put back every parameter and state tensor if the loss was not finite; state
        created by this step goes back to zeros (what SGD momentum and Adam moments start from)."""
        before = {k: t.detach().clone() for k, t in self._state_tensors().items()}
        self.optimizer.step()
        with torch.no_grad():
            for key, t in self._state_tensors().items():
                old = before.get(key)
                t.copy_(torch.where(finite, t, old if old is not None else torch.zeros_like(t)))
            self._skipped += (~finite).to(torch.int64)

    # --- capture --------------------------------------------------------------------------------------
    def _make_capturable(self) -> None:
        """Adam-style optimizers keep their step count on the host unless `capturable`; switch it on (moving
        existing step counters to the parameters' device, as load_state_dict does)."""
        for group in self.optimizer.param_groups:
            if group.get("capturable") is False:
                group["capturable"] = True
                for p in group["params"]:
                    step = self.optimizer.state.get(p, {}).get("step")
                    if torch.is_tensor(step) and step.device != p.device:
                        self.optimizer.state[p]["step"] = step.to(p.device, torch.float32)

    def _capture(self, images, labels) -> None:
        device = images.device
        static_images, static_labels = images.clone(), labels.clone()
        torch.cuda.synchronize(device)
        self.optimizer.zero_grad(set_to_none=True)  # backward then assigns (not accumulates) inside the graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = self._body(static_images, static_labels)
        self._graph = graph
        self._static = (static_images, static_labels, static_loss)
        self._hyper = _hyperparameters(self.optimizer)
        logger.info("TrainStep: captured the training step in a CUDA graph for shapes %s",
                    [tuple(t.shape) for t in (images, labels)])


# --- the benchmark's contenders ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Contender:
    """How a contender builds and runs a step (DESIGN.md §5)."""

    name: str
    patched: bool  # fastprompt.patch on the CLIP
    text_path: str  # PromptedCLIP text_path
    truncate_text: bool  # False: the reference rows keep all 77 tokens, as the research repos compute them
    compile: bool
    cuda_graph: bool | str
    weights_in_amp_dtype: bool  # frozen CLIP weights in the autocast dtype (else fp32 master weights)

    def clip_precision(self, amp_dtype: torch.dtype | None) -> str:
        if amp_dtype is None or not self.weights_in_amp_dtype:
            return "fp32"
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]


CONTENDERS = {
    # The research repos' computation made fair: unpatched open_clip, 77-token text per class, fp32 weights
    # under bf16 autocast (the repos call clip.float() for AMP).
    "eager": Contender("eager", False, "reference", False, False, False, False),
    "compiled": Contender("compiled", False, "reference", False, True, False, False),
    "fastprompt": Contender("fastprompt", True, "packed", True, False, "auto", True),
}


def build_contender(name: str, method: str, classnames, *, backbone: str = "ViT-B-16", device="cpu",
                    amp_dtype: torch.dtype | None = torch.bfloat16, lr: float = 2e-3, compile_options=None,
                    warmup_steps: int = 2, seed: int = 0, **method_options):
    """(model, TrainStep) for contender `name` training `method`: a fresh random-weight CLIP, the papers'
    optimizer (SGD, momentum 0.9, weight decay 5e-4)."""
    from .backbones import create_clip
    from .methods import build
    from .patch import patch
    from .training import make_optimizer

    if name not in CONTENDERS:
        raise ValueError(f"unknown contender {name!r}; known: {', '.join(CONTENDERS)}")
    spec = CONTENDERS[name]
    clip = create_clip(backbone, precision=spec.clip_precision(amp_dtype), device=device, seed=seed)
    if spec.patched:
        patch(clip)
    torch.manual_seed(seed)
    model = build(method, clip, classnames, text_path=spec.text_path, truncate_text=spec.truncate_text,
                  **method_options)
    model.train()
    optimizer = make_optimizer(model.trainable_parameters(), "sgd", lr=lr)
    step = TrainStep(model, optimizer, amp_dtype=amp_dtype, cuda_graph=spec.cuda_graph, compile=spec.compile,
                     compile_options=compile_options, warmup_steps=warmup_steps)
    return model, step
