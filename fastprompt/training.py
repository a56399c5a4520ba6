"""The training engine: one step (`TrainStep`) and one loop (`train_epoch`, `fit`) for every caller.

The runner (`fastprompt train`), the demo, the benchmark and users' own loops all step through `TrainStep`:

    optimizer = make_optimizer(model.trainable_parameters(), "sgd", lr=2e-3)
    step = TrainStep(model, optimizer, amp_dtype=torch.bfloat16)   # cuda_graph="auto", skip_nonfinite=True
    for epoch in range(1, epochs + 1):
        step.set_lr(lr_at(epoch, epochs, 2e-3))
        stats = train_epoch(step, loader, device=device)              # one host sync per log interval

The papers' recipe (METHODS.md §2): SGD (momentum 0.9, weight decay 5e-4) or AdamW, a learning rate set once per
epoch (a constant warm-up epoch at 1e-5, then cosine over the E epochs), the final-epoch weights evaluated.

Why the step looks the way it does (DESIGN.md §10, measured on an H200): a fastprompt step is ~14 ms of GPU work,
and without a CUDA graph its host side cost more than that. So nothing in a step waits for the device:
- the optimizer is a fused one whose learning rate is a 0-dim tensor on the device: `set_lr` fills it in place,
  a captured graph reads it, and an epoch boundary does not force a re-capture;
- a step whose loss or gradients are not finite is skipped on the device (the fused optimizers' `found_inf`, the
  mechanism GradScaler uses; other optimizers get their parameters and state put back with `torch.where`);
- the loss sum, the images trained, the skipped steps and the longest run of skipped steps accumulate in device
  tensors that `totals()` reads once per log interval; `train_epoch` raises NonFiniteLossError there when the run
  of skipped steps reached the bound (the skipped steps changed nothing, so nothing is lost by noticing late).

CUDA graphs: on CUDA with static shapes the whole step (forward, loss, backward, guard, optimizer) is captured
once after `warmup_steps` eager steps on a side stream (PyTorch's whole-network recipe) and replayed with the batch
copied into static buffers. What runs eagerly instead, logged once with the reason (kept in `graph_reason`): CPU
tensors, a batch of another shape or dtype (only that step), a capture that fails (every later step). Host-side
optimizer settings (momentum, weight decay, a float lr of a non-fused optimizer) are baked into a graph, so a change
of them re-captures. `cuda_graph=True` turns fallbacks into errors; `compile=True` runs the step through
torch.compile instead.

The last partial batch: the runner's loaders drop it (as Dassl's training sampler does, `drop_last=True`); a
caller that yields one gets it stepped eagerly (graphs are per shape), counted like any other.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


# --- schedule and optimizer ------------------------------------------------------------------------------
def lr_at(epoch: int, epochs: int, base_lr: float, warmup_epochs: int = 1, warmup_lr: float = 1e-5) -> float:
    """Learning rate of 1-based `epoch`: warm-up epochs at `warmup_lr`, then cosine with T_max = `epochs`.

    With one warm-up epoch: epoch 1 -> 1e-5, epoch e >= 2 -> base (1 + cos(pi (e - 2) / E)) / 2, the
    Dassl ConstantWarmupScheduler over CosineAnnealingLR. Without warm-up: base (1 + cos(pi (e - 1) / E)) / 2.
    """
    if not 1 <= epoch <= epochs:
        raise ValueError(f"epoch {epoch} outside 1..{epochs}")
    if epoch <= warmup_epochs:
        return warmup_lr
    step = epoch - 1 - warmup_epochs
    return base_lr * (1 + math.cos(math.pi * step / epochs)) / 2


def _fusable(params) -> bool:
    """torch's fused SGD/AdamW kernels take float parameters on CUDA or CPU, all on one device."""
    devices = {p.device for p in params}
    return (len(devices) == 1 and next(iter(devices)).type in ("cuda", "cpu")
            and all(p.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) for p in params))


def make_optimizer(params, name: str = "sgd", lr: float = 2e-3, weight_decay: float = 5e-4, momentum: float = 0.9):
    """SGD (momentum, weight decay) or AdamW over the trainable `params`: the fused implementation with the learning
    rate as a 0-dim tensor on the parameters' device where torch has one (see the module docstring)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: the method has no trainable parameters")
    fused = _fusable(params)
    rate = torch.tensor(float(lr), dtype=torch.float32, device=params[0].device) if fused else lr
    if name == "sgd":
        optimizer = torch.optim.SGD(params, lr=rate, momentum=momentum, weight_decay=weight_decay,
                                    fused=fused or None)
    elif name == "adamw":
        optimizer = torch.optim.AdamW(params, lr=rate, betas=(0.9, 0.999), weight_decay=weight_decay,
                                      fused=fused or None)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")
    return optimizer


def set_lr(optimizer, lr: float) -> None:
    """Set every group's learning rate: in place where it is a tensor (a captured graph keeps reading it)."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(float(lr))
        else:
            group["lr"] = lr


def _lr_on_device(optimizer) -> None:
    """Fused optimizers get their learning rate as a device tensor (a state loaded from JSON brings floats back)."""
    for group in optimizer.param_groups:
        if group.get("fused") and not torch.is_tensor(group["lr"]):
            device = group["params"][0].device
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def _momentum_buffers(optimizer) -> None:
    """SGD's momentum buffers start at zero instead of being created by the first step: identical updates (with
    no dampening the first step's buffer is the gradient either way), and a first step that is skipped or
    captured in a graph finds the buffer already there."""
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if group["momentum"] == 0 or group.get("dampening", 0) != 0:
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


@torch.compiler.disable
def _fused_step(optimizer, found: torch.Tensor) -> None:
    """A fused optimizer's step that skips the whole update (parameters, momentum, Adam moments and step count) when
    `found` is nonzero: the fused kernels read it from `optimizer.found_inf`. Kept out of torch.compile (compile=True):
    traced, the attribute set before the step was not yet applied when the `del` after it ran (AttributeError)."""
    optimizer.found_inf = found
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


class NonFiniteLossError(RuntimeError):
    """Too many steps in a row produced a NaN or inf loss or gradient."""


# --- the step ----------------------------------------------------------------------------------------------
def prompted_loss(model, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss of a PromptedCLIP: its forward, then the method's loss."""
    out = model(images)
    loss, _ = model.loss(out, labels)
    return loss


@dataclass(frozen=True)
class StepTotals:
    """What the steps since the last `reset_totals` did (read from the device in one go)."""

    loss_sum: float  # sum over trained (not skipped) steps of loss x batch size
    images: int  # images in trained steps
    skipped: int  # steps skipped for a non-finite loss or gradient
    longest_bad_run: int  # the longest run of consecutive skipped steps

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.images if self.images else float("nan")


_SIDE_STREAMS: dict[int, "torch.cuda.Stream"] = {}  # device index -> the warm-up side stream


def _side_stream_of(device: torch.device) -> "torch.cuda.Stream":
    """The process's one side stream on a CUDA device: graph warm-ups run on it and graphs are captured on it.

    One stream for both, for the whole process: cuBLAS keeps a workspace (32 MiB on Hopper, two with the backward
    thread) for every stream that ran a matrix multiply, for the life of the process. A fresh stream per warm-up
    step leaked 64 MiB each (found from the H200 peaks, memory.py), and torch.cuda.graph's own capture stream
    would add 64 MiB more to every graphed process."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    side = _SIDE_STREAMS.get(index)
    if side is None:
        side = _SIDE_STREAMS[index] = torch.cuda.Stream(index)
    return side


def _capturing(graph: "torch.cuda.CUDAGraph", device: torch.device):
    """torch.cuda.graph capturing `graph` on the side stream its warm-up steps ran on (see _side_stream_of)."""
    return torch.cuda.graph(graph, stream=_side_stream_of(device))


def _side_stream(device: torch.device):
    """A context running work on the side stream that joins back to the current one (CUDA only)."""
    if device.type != "cuda":
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def run():
        current = torch.cuda.current_stream(device)
        side = _side_stream_of(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            yield
        current.wait_stream(side)

    return run()


def note_no_graph(step, reason: str, log: logging.Logger, permanent: bool = True) -> None:
    """The bookkeeping of a TrainStep or EvalStep that runs a batch without its CUDA graph: an error under
    cuda_graph=True, the reason kept in `graph_reason` when it lasts, logged once per reason."""
    if step.cuda_graph is True:
        raise RuntimeError(f"cuda_graph=True but {reason}")
    if permanent:
        step.graph_reason = reason
    if reason not in step._logged:
        step._logged.add(reason)
        log.info("%s: no CUDA graph: %s", type(step).__name__, reason)


def note_capture_failure(step, error: Exception, device: torch.device, log: logging.Logger) -> None:
    """A failed capture: every later batch of `step` runs eagerly (raised instead under cuda_graph=True)."""
    step._graph, step._graph_failed = None, True
    step.graph_reason = f"CUDA graph capture failed: {type(error).__name__}: {error}"
    if step.cuda_graph is True:
        raise RuntimeError(step.graph_reason) from error
    log.warning("%s: %s; running eagerly", type(step).__name__, step.graph_reason)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # surfaces a broken context here, not later


def _graph_problem(images: torch.Tensor) -> str | None:
    """Why this batch cannot use a CUDA graph (None when it can)."""
    if images.device.type != "cuda":
        return f"CUDA graphs need CUDA tensors; the batch is on {images.device}"
    return None


def _signature(images: torch.Tensor, labels: torch.Tensor) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.device) for t in (images, labels))


def _class_set(model):
    """Which class set a model's prompt buffers belong to (PromptedCLIP.class_set_version; None for other models)."""
    return getattr(model, "class_set_version", None)


def _storage_marks(params) -> tuple:
    """Where every trained tensor lives: a move or cast of the model gives the parameters new storage, and so does
    `p.data = ...` for one of them; a replay would then update freed storage. One address read per parameter per
    replay (MCPL's 101 tensors: about 10 us, beside a replay that runs no Python)."""
    return tuple(p.data_ptr() for p in params)


def _hyperparameters(optimizer) -> tuple:
    """The optimizer settings a captured graph has baked in (host-side numbers, not tensors)."""
    plain = (bool, int, float, str, type(None), tuple)
    return tuple(
        tuple(sorted((k, v) for k, v in group.items() if k != "params" and isinstance(v, plain)))
        for group in optimizer.param_groups
    )


class TrainStep:
    """forward + loss + backward + non-finite guard + optimizer step; see the module docstring.

    Args:
        model: a PromptedCLIP, or any module `loss_fn` understands.
        optimizer: over the trainable parameters (`make_optimizer` gives the fused, device-lr kind).
        loss_fn: (model, images, labels) -> scalar loss; default `prompted_loss`.
        amp_dtype: autocast dtype (torch.bfloat16 / torch.float16) or None for none.
        cuda_graph: 'auto' (capture on CUDA, fall back with a logged reason), True (capture or raise), False.
        compile: run the step through torch.compile (excludes cuda_graph=True); `compile_options` are passed on.
        warmup_steps: eager steps before the capture (at least 1).
        skip_nonfinite: skip steps whose loss or gradients are not finite, without a host synchronisation.
        accumulate: split each batch into this many micro-batches (sizes differ by at most one), run forward and
            backward on each in turn and update once: the update equals the whole batch's for losses that are a
            mean over images plus image-independent terms (every method here), while autograd keeps one
            micro-batch's activations at a time. The text tower runs once per micro-batch.
        grad_sync: called once per step as `grad_sync(grads)` with the trainable parameters' gradients (after the
            last micro-batch's backward, before the non-finite check and the update; inside the CUDA graph when
            the step is graphed). Data-parallel training averages them across processes here, so every process
            sees the same gradients and skips or applies the same steps.
    """

    def __init__(self, model, optimizer, *, loss_fn=prompted_loss, amp_dtype: torch.dtype | None = None,
                 cuda_graph: bool | str = "auto", compile: bool = False, compile_options: dict | None = None,
                 warmup_steps: int = 3, skip_nonfinite: bool = True, accumulate: int = 1, grad_sync=None):
        if cuda_graph not in ("auto", True, False):
            raise ValueError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
        if compile and cuda_graph is True:
            raise ValueError("compile=True with cuda_graph=True: use compile_options={'mode': 'reduce-overhead'}"
                             " for CUDA graphs of compiled code")
        if amp_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"amp_dtype must be torch.bfloat16, torch.float16 or None, got {amp_dtype!r}")
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an int >= 1, got {warmup_steps!r}")
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise ValueError(f"accumulate must be an int >= 1 (micro-batches per step), got {accumulate!r}")
        if grad_sync is not None and not callable(grad_sync):
            raise TypeError(f"grad_sync must be callable (grads -> None), got {type(grad_sync).__name__}")
        self.accumulate, self.grad_sync = accumulate, grad_sync
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.amp_dtype = amp_dtype
        self.cuda_graph = False if compile else cuda_graph
        self.warmup_steps = warmup_steps
        self.skip_nonfinite = skip_nonfinite
        self.graph_reason: str | None = "compile=True" if compile else None
        self.steps = 0
        _lr_on_device(optimizer)
        _momentum_buffers(optimizer)
        self._params = [p for group in optimizer.param_groups for p in group["params"]]
        self._fused = all(group.get("fused") for group in optimizer.param_groups)
        device = self._params[0].device if self._params else torch.device("cpu")
        # Device-side bookkeeping, created outside any capture so that replays update the same tensors.
        self._totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, images, skipped, longest run
        self._run = torch.zeros(1, dtype=torch.float64, device=device)  # current run of skipped steps
        self._found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self._one = torch.ones((), dtype=torch.float32, device=device)
        self._compiled = torch.compile(self._eager_step, **(compile_options or {})) if compile else None
        self._graph = None
        self._graph_failed = False
        self._signature = None  # shapes the graph was captured for
        self._hyper = None
        self._class_set = None
        self._storages = None
        self._warm = 0
        self._static: tuple | None = None
        self._logged: set[str] = set()

    # --- public ---------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """'cuda_graph' once captured, 'compiled' with compile=True, else 'eager'."""
        if self._graph is not None:
            return "cuda_graph"
        return "compiled" if self._compiled is not None else "eager"

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def totals(self) -> StepTotals:
        """What the steps since the last reset did (one host synchronisation)."""
        loss_sum, images, skipped, run = self._totals.tolist()
        return StepTotals(loss_sum, int(images), int(skipped), int(run))

    def reset_totals(self) -> None:
        self._totals.zero_()
        self._run.zero_()

    @property
    def skipped_steps(self) -> int:
        """Steps skipped since the last reset (synchronises)."""
        return self.totals().skipped

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        if self.cuda_graph is False or self._graph_failed:
            return self._run_step(images, labels)
        problem = _graph_problem(images)
        if problem is not None:
            return self._no_graph(problem, images, labels)
        signature = _signature(images, labels)
        if self._signature is not None and signature != self._signature:
            shapes = ", ".join(str(s[0]) for s in signature)
            return self._no_graph(f"batch shapes {shapes} differ from the captured "
                                  f"{', '.join(str(s[0]) for s in self._signature)}; such steps run eagerly",
                                  images, labels, permanent=False)
        if self._graph is not None and (_class_set(self.model) != self._class_set
                                        or _storage_marks(self._params) != self._storages):
            # The graph reads tensors by address: the old class set's prompt buffers (set_classnames frees them),
            # or the parameters' old storage (model.to(), .half(), `p.data = ...` give them new storage). One eager
            # step builds what is new (the packing is read from the host, which a capture cannot), then a capture.
            logger.info("TrainStep: the model's class set or its parameters' storage changed; re-capturing the"
                        " CUDA graph")
            self._graph, self._static = None, None
            self._warm = self.warmup_steps - 1
        if self._graph is not None and _hyperparameters(self.optimizer) != self._hyper:
            logger.info("TrainStep: optimizer hyperparameters changed; re-capturing the CUDA graph")
            self._graph = None
        if self._graph is None:
            if self._warm < self.warmup_steps:
                self._warm += 1
                if self._warm == 1:
                    self._make_capturable()
                with _side_stream(images.device):
                    return self._run_step(images, labels)
            try:
                self._capture(images, labels)
            except Exception as error:  # noqa: BLE001 - any capture failure means: run eagerly
                note_capture_failure(self, error, images.device, logger)
                return self._run_step(images, labels)
            self._signature = signature
            self.graph_reason = None
        static_images, static_labels, static_loss = self._static
        static_images.copy_(images)
        static_labels.copy_(labels)
        self._graph.replay()
        # A replay runs no Python: bump the trained tensors' version counters as an eager step does, so that what
        # keys on them (the model's inference cache) sees the update.
        torch.autograd.graph.increment_version(self._params)
        return static_loss.clone()

    # --- the step -------------------------------------------------------------------------------------
    def _body(self, images, labels) -> torch.Tensor:
        """forward, loss, backward (per micro-batch), gradient sync, guarded optimizer step, totals (gradients must
        be None on entry)."""
        count = labels.shape[0]
        parts = min(self.accumulate, count) if count else 1
        loss = None
        for part_images, part_labels in zip(images.tensor_split(parts), labels.tensor_split(parts)):
            with torch.autocast(images.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                part = self.loss_fn(self.model, part_images, part_labels)
            if parts > 1:
                # Each micro-batch's mean loss weighted by its share of the batch: the weighted sum is the batch mean.
                part = part * (part_labels.shape[0] / count)
            part.backward()  # gradients accumulate into .grad across micro-batches
            loss = part.detach() if loss is None else loss + part.detach()
        if self.grad_sync is not None:
            grads = [p.grad for p in self._params if p.grad is not None]
            if grads:
                # A loss that is not finite on this process alone (its gradients finite) must skip the step on every
                # process: carried into the synced gradients as a NaN, every process's guard sees it.
                grads[0].add_(torch.where(torch.isfinite(loss), 0.0, float("nan")).to(grads[0].dtype))
            self.grad_sync(grads)
        if self.skip_nonfinite:
            finite = self._guarded_update(loss)
        else:
            self.optimizer.step()
            finite = torch.isfinite(loss)
        self._count(loss, finite, labels.shape[0])
        return loss

    def _eager_step(self, images, labels) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        return self._body(images, labels)

    def _run_step(self, images, labels) -> torch.Tensor:
        return (self._compiled or self._eager_step)(images, labels)

    def _no_graph(self, reason: str, images, labels, permanent: bool = True):
        note_no_graph(self, reason, logger, permanent)
        return self._run_step(images, labels)

    # --- non-finite steps and totals ------------------------------------------------------------------
    def _nonfinite(self, loss: torch.Tensor) -> torch.Tensor:
        """1.0 when the loss or any gradient is not finite, else 0.0 (a 0-dim float tensor on the device)."""
        found = self._found_inf
        found.zero_()
        grads = [p.grad for p in self._params if p.grad is not None]
        if grads:
            # GradScaler's multi-tensor check (scale 1: the gradients are unchanged): one launch per dtype.
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, self._one)
        return torch.maximum(found, (~torch.isfinite(loss)).to(found.dtype))

    def _guarded_update(self, loss: torch.Tensor) -> torch.Tensor:
        """optimizer.step() that changes nothing when the step is not finite; returns the 0-dim finite flag."""
        found = self._nonfinite(loss)
        if self._fused:
            _fused_step(self.optimizer, found)
            return found == 0
        finite = found == 0
        tensors = self._state_tensors()
        before = {k: t.detach().clone() for k, t in tensors.items()}
        self.optimizer.step()
        with torch.no_grad():
            for key, t in self._state_tensors().items():
                old = before.get(key)
                t.copy_(torch.where(finite, t, old if old is not None else torch.zeros_like(t)))
        return finite

    def _state_tensors(self) -> dict:
        out = {}
        for p in self._params:
            out[(id(p), "param")] = p
            for key, value in self.optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    out[(id(p), key)] = value
        return out

    def _count(self, loss: torch.Tensor, finite: torch.Tensor, images: int) -> None:
        with torch.no_grad():
            bad = (~finite).to(torch.float64).reshape(1)
            self._run.mul_(bad).add_(bad)  # (run + 1) if skipped else 0
            good = 1 - bad
            trained = torch.cat([torch.where(finite, loss.to(torch.float64), 0.0).reshape(1) * images,
                                 good * images, bad])
            self._totals[:3].add_(trained)
            torch.maximum(self._totals[3:], self._run, out=self._totals[3:])

    # --- capture --------------------------------------------------------------------------------------
    def _make_capturable(self) -> None:
        """Adam-style optimizers refuse graph capture unless `capturable` (the non-fused ones keep their step count
        on the host otherwise); switch it on, moving existing step counters to the parameters' device as
        load_state_dict does. Measured on an H200: fused AdamW without it fails to capture."""
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
        with _capturing(graph, device):
            static_loss = self._body(static_images, static_labels)
        self._graph = graph
        self._static = (static_images, static_labels, static_loss)
        self._hyper = _hyperparameters(self.optimizer)
        self._class_set = _class_set(self.model)
        self._storages = _storage_marks(self._params)
        logger.info("TrainStep: captured the training step in a CUDA graph for shapes %s",
                    [tuple(t.shape) for t in (images, labels)])


# --- the loop ----------------------------------------------------------------------------------------------
@dataclass
class EpochStats:
    loss: float  # mean loss over trained images
    images: int  # images trained (skipped steps excluded)
    seconds: float  # wall time of the epoch, device work included
    skipped_steps: int
    loader_seconds: float = 0.0  # wall time spent waiting for the next batch
    steps: int = 0
    delivered: int = 0  # images the loader delivered (skipped steps included)
    starved_steps: int | None = None  # steps whose batch came when the device had no work left (CUDA; else None)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    @property
    def loader_images_per_second(self) -> float:
        """Images per second the loader delivered while the loop waited for it (inf: it never made the loop wait)."""
        return self.delivered / self.loader_seconds if self.loader_seconds > 0 else float("inf")

    @property
    def loader_bound(self) -> bool:
        """The loader is the limit: the loop spent more than a quarter of the epoch waiting for data and, on a GPU,
        the device had run out of work when most batches came. There the host runs ahead of the device, so time in
        the loader is hidden behind queued steps (a device-held set's augmentation of the next batch runs while the
        GPU computes the last step), and a host held up by a full launch queue waits inside the loader too: its
        share of the epoch alone would blame the loader for a GPU-bound run."""
        if not (self.seconds > 0 and self.loader_seconds > 0.25 * self.seconds):
            return False
        return self.starved_steps is None or self.starved_steps > self.steps / 2


def _device_idle(device: torch.device) -> bool | None:
    """Whether `device` has finished all the work queued on its current stream, asked without waiting (CUDA); None
    where work runs as it is issued (CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.current_stream(device).query()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_run(totals: StepTotals, max_bad_steps: int, where: str) -> None:
    if totals.longest_bad_run >= max_bad_steps:
        raise NonFiniteLossError(
            f"{totals.longest_bad_run} non-finite steps in a row ({where}); stopping (lower the lr, or use "
            "bf16/fp32 precision)")


def train_epoch(step: TrainStep, batches, *, device=None, progress=None, log_every: int = 50, on_log=None,
                max_bad_steps: int = 5, input_dtype: torch.dtype | None = None) -> EpochStats:
    """One pass of `step` over `batches` (an iterable of (images, labels)).

    Nothing per step waits for the device: `progress(n)` (e.g. a tqdm update) is called after each step with the
    step's batch size; every `log_every` steps, and at the end, the device totals are read once: `on_log(step_index,
    mean_loss_so_far)` is called, skipped steps are warned about, and NonFiniteLossError is raised when
    `max_bad_steps` steps in a row were skipped. `input_dtype` casts the images (fp16-parity precision).
    """
    device = torch.device(device) if device is not None else step._totals.device
    step.model.train()
    step.reset_totals()
    warned = 0
    _sync(device)
    start = time.perf_counter()
    loader_seconds, count, delivered, starved = 0.0, 0, 0, None

    def report(index: int) -> StepTotals:
        nonlocal warned
        totals = step.totals()
        if totals.skipped > warned:
            warnings.warn(f"{totals.skipped - warned} step(s) with a non-finite loss or gradient skipped "
                          f"(by step {index + 1} of this epoch)", RuntimeWarning, stacklevel=3)
            warned = totals.skipped
        _check_run(totals, max_bad_steps, f"by step {index + 1}")
        if on_log is not None:
            on_log(index, totals.mean_loss)
        return totals

    last = None
    iterator = iter(batches)
    while True:
        waited = time.perf_counter()
        try:
            images, labels = next(iterator)
        except StopIteration:
            break
        loader_seconds += time.perf_counter() - waited
        idle = _device_idle(device)
        if idle is not None:
            starved = (starved or 0) + idle
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if input_dtype is not None:
            images = images.to(input_dtype)
        step(images, labels)
        count += 1
        delivered += labels.shape[0]
        if progress is not None:
            progress(labels.shape[0])
        last = None
        if log_every and count % log_every == 0:
            last = report(count - 1)
    totals = last or (report(count - 1) if count else step.totals())
    _sync(device)
    seconds = time.perf_counter() - start
    return EpochStats(loss=totals.mean_loss, images=totals.images, seconds=seconds, skipped_steps=totals.skipped,
                      loader_seconds=loader_seconds, steps=count, delivered=delivered, starved_steps=starved)


def fit(step: TrainStep, batches, epochs: int, lr_of_epoch, *, start_epoch: int = 1, device=None,
        on_epoch_end=None, progress_for_epoch=None, log_every: int = 50, max_bad_steps: int = 5,
        input_dtype: torch.dtype | None = None) -> list[EpochStats]:
    """Epochs `start_epoch..epochs` of `train_epoch`, the learning rate `lr_of_epoch(epoch)` set before each.

    `on_epoch_end(epoch, lr, stats)` runs after each epoch (checkpoints, logs, prompt averaging);
    `progress_for_epoch(epoch)` may return a context manager yielding a per-step progress callable.
    """
    history = []
    for epoch in range(start_epoch, epochs + 1):
        lr = lr_of_epoch(epoch)
        step.set_lr(lr)
        bar = progress_for_epoch(epoch) if progress_for_epoch is not None else contextlib.nullcontext(None)
        with bar as progress:
            stats = train_epoch(step, batches, device=device, progress=progress, log_every=log_every,
                                max_bad_steps=max_bad_steps, input_dtype=input_dtype)
        history.append(stats)
        if on_epoch_end is not None:
            on_epoch_end(epoch, lr, stats)
    return history


# --- memory ------------------------------------------------------------------------------------------------
def peak_memory(device) -> tuple[float, str]:
    """(peak bytes, what was measured): CUDA max allocated since the last reset, or the process's peak RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device)), "GPU peak allocated"
    import sys

    try:
        import resource
    except ImportError:  # Windows has no getrusage
        return float("nan"), "peak RSS (unavailable)"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return float(peak if sys.platform == "darwin" else peak * 1024), "peak RSS"


def reset_peak_memory(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
