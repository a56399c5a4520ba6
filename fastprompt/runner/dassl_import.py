"""Import a checkpoint trained with the papers' own (Dassl-based) code into a fastprompt checkpoint folder.

    fastprompt import-dassl output/.../MultiModalPromptLearner/model.pth.tar-5 --method maple \
        --classnames names.txt --output maple-eurosat
    fastprompt eval --checkpoint maple-eurosat --dataset eurosat --root /data

A Dassl checkpoint (`model.pth.tar-N`, `model-best.pth.tar`) is a torch.save'd dict {'state_dict', 'epoch',
'optimizer', 'scheduler', 'val_result'}. Only 'state_dict' and 'epoch' are used. Dassl saves 'epoch' as the
number of finished epochs; it is recorded as given.

Reading. torch.load(..., weights_only=True): no code from the file runs. Dassl's warm-up scheduler keeps its
successor (a torch scheduler object holding the optimizer) in its state_dict (Dassl.pytorch
dassl/optim/lr_scheduler.py@27eb2f4, `self.successor = successor`), so every real file pickles those objects.
A weights-only load refuses them, so the few class names Dassl can write there are mapped to inert stand-ins
(`_SkippedObject`, `_plain_dict`); nothing of torch.optim is built. Any other class stops the import with
one line naming it.

Key layouts. Each layout below was read from the trainer file at the commit given:
  CoOp    KaiyangZhou/CoOp trainers/coop.py@c5a45c5: registers the prompt learner alone ("prompt_learner"):
          ctx [n, d_t] (generic) or [C, n, d_t] (class-specific, CSC) -> text_sources.1.tokens.
  CoCoOp  KaiyangZhou/CoOp trainers/cocoop.py@1fbb1a6: ctx [n, d_t] -> text_sources.1.base.tokens;
          meta_net.linear1.{weight,bias} -> text_sources.1.net.0.*, meta_net.linear2.* -> text_sources.1.net.2.*
  MaPLe   muzairkhattak/multimodal-prompt-learning trainers/maple.py@904dbd7: registers the whole CustomCLIP:
          prompt_learner.ctx -> text_sources.1.tokens; prompt_learner.proj -> vision_sources.1.mapping;
          prompt_learner.compound_prompts_text.i -> text_sources.{i+2}.tokens;
          prompt_learner.compound_prompt_projections.i -> vision_sources.{i+2}.mapping (depth = 1 + count).
  IVLP    same repo, trainers/independentVL.py + clip/model.py@904dbd7 (whole CustomCLIP):
          prompt_learner.ctx -> text_sources.1.tokens;
          text_encoder.transformer.resblocks.i.VPT_shallow -> text_sources.{i+1}.tokens (i >= 1);
          image_encoder.VPT -> vision_sources.1.tokens;
          image_encoder.transformer.resblocks.i.VPT_shallow -> vision_sources.{i+1}.tokens (i >= 1).
  VPT     same repo, trainers/vpt.py@904dbd7: the image_encoder keys of IVLP only (text: the fixed template).
  PromptSRC  muzairkhattak/PromptSRC trainers/promptsrc.py@8be7dcf: IVLP's keys (its ZS_image_encoder teacher is
          dropped). The saved weights after the last epoch are already the GPA average (the trainer loads it
          before Dassl saves); model-best may be an earlier, unaveraged epoch.
  MMRL    yunncheng/MMRL trainers/mmrl.py@f6ad5e6 (and @04467a7, same names), clip/model_mmrl.py@208ba96:
          representation_learner.compound_rep_tokens -> {text,vision}_sources.l.source.tokens (one tensor);
          representation_learner.compound_rep_tokens_r2tproj.j -> text_sources.{first+j}.mapping;
          ...r2vproj.j -> vision_sources.{first+j}.mapping; image_encoder.proj_rep -> proj_rep.
Dropped: the class-dependent buffers token_prefix / token_suffix (CoOp, CoCoOp, MaPLe, IVLP, PromptSRC) and
prompt_embeddings (MMRL), which the trainers themselves delete before loading, and the frozen CLIP the
whole-model trainers save with their prompts (image_encoder.*, text_encoder.*, logit_scale). A frozen-CLIP key
whose name marks a learned tensor (VPT, proj_rep) is never dropped: it must be mapped or the import fails.
Every target tensor is filled, shapes must match, and missing or unknown keys fail in one error listing them.
fp16 tensors (PREC fp16) become fp32, the dtype of fastprompt's parameters.

Options. The shape options come from the tensors (n_ctx, class_specific, depth, n_text/n_vision and the
depths, meta_hidden, n_tokens, rep_dim, first_layer) and cannot be overridden; the others take the released
configs' values, and `options` (`--option key=value`) may set them.

Decisions (paper or released code, and ours for the import):
  * Class buffers: dropped, as the trainers do ("they should be ignored in load_model() as we want to use those
    computed using the current class names", trainers/coop.py): fastprompt rebuilds them for any class set.
  * dtype: fp16 prompts (PREC fp16; MaPLe's proj is always .half()) become fp32, our parameters' dtype; the
    values are exact (fp16 -> fp32 loses nothing).
  * MaPLe / IVLP ctx_init: the trainers' rule, "if ctx_init and (n_ctx) <= 4" the first n_ctx tokens of
    "a photo of a" are learned and the rest of it stays words, else n placeholders. The MaPLe paper's "strong
    coupling between the vision-language prompts" is its maps F_l (proj, compound_prompt_projections), imported
    as they are, so the vision prompts are recomputed from the text prompts exactly as the trainer did. A run
    trained with another CTX_INIT must give it.
  * CoOp / CoCoOp template: every context token replaces a template word whatever CTX_INIT was, so the template
    is placeholders and ctx_init is recorded as None. CLASS_TOKEN_POSITION is not in the file: 'end' (every
    shipped config) is assumed; a 'middle' or 'front' run would load and predict differently (documented, not
    detectable).
  * MMRL fusion: the paper writes "p(y=c|x) = α·p(y=c|f_c) + (1-α)·p(y=c|f_r)"; the released code fuses logits.
    Import records fusion='logits', the code that trained the file and produced the run's numbers (training
    in fastprompt keeps the paper's 'probs'); `--option fusion=probs` gives the paper's.
  * MMRL template: "Hand-crafted text prompts from prior methods ... are utilized and described in detail in
    Tab. 7" (CUSTOM_TEMPLATES per dataset in the trainer). The file does not say which: "a photo of a {}." is
    recorded unless `--option template=...` names the run's (EuroSAT "a centered satellite photo of {}.", ...).
  * MMRL layers: first_layer = layers - (number of maps) + 1, i.e. REP_LAYERS contiguous up to the last layer
    (every shipped config: [6..12]); other REP_LAYERS cannot be told apart from the file. Backbones with towers
    of unequal depth (ViT-L/14) are refused: the trainer's one REP_LAYERS list and our per-tower J..L differ.
  * PromptSRC: fastprompt's promptsrc has one n_ctx and one depth for both towers; other shapes are refused
    with a pointer to --method ivlp, which predicts the same (the self-regularising losses act only in
    training). The last epoch's file already holds the GPA average; model-best may not.
  * VPT: text is the trainer's fixed "a photo of a {}." (FixedEmbeddings), our vpt_deep default.
Class names: every method records them (the default class set of eval/predict, and MMRL's base/novel choice);
CoOp's class-specific context needs them in the training label order (row i is class i).
Backbone: the whole-model checkpoints carry the frozen image encoder, whose patch embedding and positions are
checked against the backbone. CoOp's context (512 wide for RN50 and ViT-B/16 alike) does not show the
backbone, so the CLI asks for it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass, field

import torch

from .checkpoint import CheckpointError, backbone_record, now, save_checkpoint

# Methods whose official trainers' layouts are documented above; keys are fastprompt method names.
IMPORTABLE = ("coop", "cocoop", "maple", "ivlp", "vpt_deep", "promptsrc", "mmrl")


class DasslImportError(CheckpointError):
    """The file is not a readable Dassl checkpoint of the named method; the message says why."""


# --- reading ---------------------------------------------------------------------------------------------
class _SkippedObject:
    """Stands in for an optimizer or scheduler object pickled inside Dassl's scheduler state: its state is read
    (it has to be, to reach the tensors after it) and dropped."""

    def __setstate__(self, state) -> None:
        pass


def _plain_dict(*_factory) -> dict:
    """Stands in for collections.defaultdict (an optimizer's per-parameter state): a plain dict of the items."""
    return {}


# The classes Dassl's build_optimizer / build_lr_scheduler create (Dassl.pytorch dassl/optim/*.py), by the
# names pickle writes for them, in the torch versions the papers pin (1.9-1.12) and today's.
_DASSL_OBJECTS = (
    "torch.optim.sgd.SGD", "torch.optim.adam.Adam", "torch.optim.adamw.AdamW", "torch.optim.rmsprop.RMSprop",
    "dassl.optim.radam.RAdam", "dassl.optim.radam.PlainRAdam", "dassl.optim.radam.AdamW",
    "torch.optim.lr_scheduler.CosineAnnealingLR", "torch.optim.lr_scheduler.StepLR",
    "torch.optim.lr_scheduler.MultiStepLR",
)


def read_dassl_checkpoint(path: str) -> tuple[dict, object]:
    """(state_dict as saved, epoch or None) of a Dassl checkpoint, read without running code from it."""
    if not os.path.isfile(path):
        raise DasslImportError(f"Dassl checkpoint not found: {path}")
    if not hasattr(torch.serialization, "safe_globals"):
        raise DasslImportError(f"importing Dassl checkpoints needs torch >= 2.6 (its weights-only load with named"
                               f" stand-ins); this is torch {torch.__version__}")
    stand_ins = [(_SkippedObject, name) for name in _DASSL_OBJECTS] + [(_plain_dict, "collections.defaultdict"), dict]
    try:
        with torch.serialization.safe_globals(stand_ins):
            content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" not in str(error).lower() and "WeightsUnpickler" not in str(error):
            raise DasslImportError(f"{path} is not a torch checkpoint file ({str(error).splitlines()[0]})") from None
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f"it pickles {found.group(1)}" if found else str(error).splitlines()[0]
        raise DasslImportError(
            f"{path} needs more than a weights-only load ({what}); fastprompt does not run code from checkpoint"
            " files. Re-save its 'state_dict' and 'epoch' alone with torch.save where you trust the file"
        ) from None
    except OSError:
        raise
    except Exception as error:  # noqa: BLE001 - a file that is not a torch save fails anywhere in the unpickler
        # (IndexError, EOFError, BadZipFile, RuntimeError, ...): each means the same to the user.
        raise DasslImportError(f"{path} is not a torch checkpoint file ({type(error).__name__}:"
                               f" {str(error).splitlines()[0] if str(error) else 'unreadable'})") from None
    if not isinstance(content, dict) or not isinstance(content.get("state_dict"), dict):
        raise DasslImportError(f"{path} is not a Dassl checkpoint: it holds no 'state_dict' dict")
    state = content["state_dict"]
    bad = [k for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise DasslImportError(f"{path}: state_dict entries that are not named tensors: {bad[:5]}")
    if state and all(k.startswith("module.") for k in state):  # saved from inside nn.DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    epoch = content.get("epoch")
    return state, epoch if isinstance(epoch, int) else None


# --- layouts ---------------------------------------------------------------------------------------------
@dataclass
class Layout:
    """What one checkpoint becomes: the shape options read from it and {our parameter name: source key}."""

    options: dict
    mapping: dict = field(default_factory=dict)
    fixed: tuple = ()  # option names the tensors decide (an --option for them is refused)


_FROZEN_CLIP = ("image_encoder.", "text_encoder.")
_LEARNED_MARKS = ("VPT", "proj_rep")


def _droppable(key: str, whole_model: bool) -> bool:
    """Keys the trainers save but that hold nothing learned: class buffers, and (when the trainer saves the
    whole CustomCLIP) the frozen CLIP and PromptSRC's frozen teacher."""
    if key.rsplit(".", 1)[-1] in ("token_prefix", "token_suffix", "prompt_embeddings"):
        return True
    if not whole_model:
        return False
    if key.startswith("prompt_learner.ZS_image_encoder."):
        return True
    if key == "logit_scale" or key.startswith(_FROZEN_CLIP):
        return not any(mark in key for mark in _LEARNED_MARKS)
    return False


def _indices(state: dict, pattern: str) -> list[int]:
    """The integers i of every key matching `pattern` (a regex with one (\\d+) group), sorted."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state if (m := rx.fullmatch(k))})


def _count(indices: list[int], start: int) -> int:
    """How many consecutive layers a key family spans from `start` (gaps then show up as missing keys)."""
    return max(indices) - start + 1 if indices else 0


def _coop(state, info) -> Layout:
    ctx = _need(state, "ctx")
    csc = ctx.dim() == 3
    return Layout({"n_ctx": ctx.shape[-2], "ctx_init": None, "class_specific": csc},
                  {"text_sources.1.tokens": "ctx"}, ("n_ctx", "class_specific", "ctx_init"))


def _cocoop(state, info) -> Layout:
    ctx, hidden = _need(state, "ctx"), _need(state, "meta_net.linear1.weight")
    mapping = {"text_sources.1.base.tokens": "ctx"}
    for ours, theirs in (("0", "linear1"), ("2", "linear2")):
        for part in ("weight", "bias"):
            mapping[f"text_sources.1.net.{ours}.{part}"] = f"meta_net.{theirs}.{part}"
    return Layout({"n_ctx": ctx.shape[0], "ctx_init": None, "meta_hidden": hidden.shape[0]}, mapping,
                  ("n_ctx", "ctx_init", "meta_hidden"))


def _maple(state, info) -> Layout:
    ctx = _need(state, "prompt_learner.ctx")
    deeper = _count(_indices(state, r"prompt_learner\.compound_prompts_text\.(\d+)"), 0)
    projections = _count(_indices(state, r"prompt_learner\.compound_prompt_projections\.(\d+)\.weight"), 0)
    depth = 1 + max(deeper, projections)
    n = ctx.shape[0]
    mapping = {"text_sources.1.tokens": "prompt_learner.ctx", "vision_sources.1.source.tokens": "prompt_learner.ctx",
               "vision_sources.1.mapping.weight": "prompt_learner.proj.weight",
               "vision_sources.1.mapping.bias": "prompt_learner.proj.bias"}
    for i in range(depth - 1):
        layer, text = i + 2, f"prompt_learner.compound_prompts_text.{i}"
        mapping[f"text_sources.{layer}.tokens"] = text
        mapping[f"vision_sources.{layer}.source.tokens"] = text
        for part in ("weight", "bias"):
            mapping[f"vision_sources.{layer}.mapping.{part}"] = f"prompt_learner.compound_prompt_projections.{i}.{part}"
    return Layout({"n_ctx": n, "depth": depth, "ctx_init": "a photo of a" if n <= 4 else None}, mapping,
                  ("n_ctx", "depth"))


def _deep_prompts(state, tower: str, first: str) -> tuple[int, int, dict]:
    """(n tokens, depth, mapping) of IVLP-style per-layer prompts in one tower: `first` holds layer 1,
    <tower>.transformer.resblocks.i.VPT_shallow layer i+1."""
    prefix = f"{tower}.transformer.resblocks."
    layers = _count(_indices(state, re.escape(prefix) + r"(\d+)\.VPT_shallow"), 1)
    if first not in state:
        return 0, 0, {}
    ours = "text_sources" if tower == "text_encoder" else "vision_sources"
    mapping = {f"{ours}.1.tokens": first}
    mapping.update({f"{ours}.{i + 1}.tokens": f"{prefix}{i}.VPT_shallow" for i in range(1, layers + 1)})
    return state[first].shape[0], 1 + layers, mapping


def _ivlp(state, info) -> Layout:
    _need(state, "prompt_learner.ctx")  # the trainer asserts a language depth >= 1
    n_text, text_depth, text = _deep_prompts(state, "text_encoder", "prompt_learner.ctx")
    n_vision, vision_depth, vision = _deep_prompts(state, "image_encoder", "image_encoder.VPT")
    options = {"n_text": n_text, "n_vision": n_vision, "text_depth": text_depth, "vision_depth": vision_depth,
               "ctx_init": "a photo of a" if n_text <= 4 else None}
    return Layout(options, {**text, **vision}, ("n_text", "n_vision", "text_depth", "vision_depth"))


def _vpt(state, info) -> Layout:
    n_vision, depth, vision = _deep_prompts(state, "image_encoder", "image_encoder.VPT")
    if not n_vision:
        _need(state, "image_encoder.VPT")
    return Layout({"n_vision": n_vision, "vision_depth": depth}, vision, ("n_vision", "vision_depth"))


def _promptsrc(state, info) -> Layout:
    layout = _ivlp(state, info)
    o = layout.options
    if (o["n_text"], o["text_depth"]) != (o["n_vision"], o["vision_depth"]):
        raise DasslImportError(
            f"this PromptSRC checkpoint has {o['n_text']} text tokens over {o['text_depth']} layers and"
            f" {o['n_vision']} vision tokens over {o['vision_depth']} layers; fastprompt's promptsrc has one n_ctx"
            " and one depth for both towers. Import it with --method ivlp: it predicts the same (PromptSRC's"
            " extra losses act only in training)")
    return Layout({"n_ctx": o["n_text"], "depth": o["text_depth"]}, layout.mapping, ("n_ctx", "depth"))


def _mmrl(state, info) -> Layout:
    tokens = _need(state, "representation_learner.compound_rep_tokens")
    family = "representation_learner.compound_rep_tokens_r2{}proj"
    count = max(_count(_indices(state, re.escape(family.format(t)) + r"\.(\d+)\.weight"), 0) for t in "tv")
    if info.text.layers != info.vision.layers:
        # The trainer puts the same REP_LAYERS into both towers; fastprompt's MMRL runs each tower's tokens from
        # first_layer to that tower's own last layer, so on unequal towers (ViT-L/14) the meaning would change.
        raise DasslImportError(
            f"MMRL checkpoints import onto towers of equal depth only: the official trainer uses one REP_LAYERS"
            f" list for both, fastprompt's mmrl runs to each tower's last layer ({info.text.layers} text,"
            f" {info.vision.layers} vision layers here)")
    first = info.text.layers - count + 1
    latent = "representation_learner.compound_rep_tokens"
    mapping = {"proj_rep": "image_encoder.proj_rep"}
    for j in range(count):
        layer = first + j
        for ours, t in (("text_sources", "t"), ("vision_sources", "v")):
            mapping[f"{ours}.{layer}.source.tokens"] = latent
            for part in ("weight", "bias"):
                mapping[f"{ours}.{layer}.mapping.{part}"] = f"{family.format(t)}.{j}.{part}"
    options = {"n_tokens": tokens.shape[0], "rep_dim": tokens.shape[1], "first_layer": first, "fusion": "logits"}
    return Layout(options, mapping, ("n_tokens", "rep_dim", "first_layer"))


_LAYOUTS = {"coop": _coop, "cocoop": _cocoop, "maple": _maple, "ivlp": _ivlp, "vpt_deep": _vpt,
            "promptsrc": _promptsrc, "mmrl": _mmrl}
_WHOLE_MODEL = ("maple", "ivlp", "vpt_deep", "promptsrc", "mmrl")  # trainers that register the whole CustomCLIP


def _need(state: dict, key: str) -> torch.Tensor:
    if key not in state:
        present = sorted(state)
        raise DasslImportError(f"missing key {key!r}: not a checkpoint of this method's official trainer"
                               f" (it holds {len(present)} keys, e.g. {present[:4]})")
    return state[key]


# --- import ----------------------------------------------------------------------------------------------
def _check_backbone(state: dict, clip, backbone: str) -> None:
    """A whole-model checkpoint carries the frozen image encoder: its patch embedding and positions must be the
    backbone's (ViT-B/32 and B/16 share every prompt width, and would otherwise pass unnoticed)."""
    visual = getattr(clip, "visual", None)
    for key, ours in (("image_encoder.conv1.weight", getattr(visual, "conv1", None)),
                      ("image_encoder.positional_embedding", getattr(visual, "positional_embedding", None))):
        ours = getattr(ours, "weight", ours)
        if key in state and torch.is_tensor(ours) and tuple(state[key].shape) != tuple(ours.shape):
            raise DasslImportError(
                f"the checkpoint's frozen image encoder has {key} of shape {tuple(state[key].shape)}, backbone"
                f" {backbone!r} has {tuple(ours.shape)}: give the backbone the run was trained on with --backbone")


def _merge_options(method: str, layout: Layout, given: dict | None) -> dict:
    from ..methods import method_options

    known = method_options(method)
    options = {**known, **layout.options}
    for name, value in (given or {}).items():
        if name not in known:
            raise DasslImportError(f"method {method!r} has no option {name!r}; its options: {sorted(known)}")
        if name in layout.fixed and value != layout.options[name]:
            raise DasslImportError(f"option {name} is read from the checkpoint ({layout.options[name]!r});"
                                   f" it cannot be set to {value!r}")
        options[name] = value
    return options


def _run_config(method: str, options: dict, backbone: str, pretrained: str | None) -> dict:
    """The run config `fastprompt eval --checkpoint` rebuilds the model from: the method, its options and the
    backbone; everything else (data, protocol) is the defaults, as the Dassl file holds none of it: evaluate
    an imported checkpoint with --dataset."""
    from .config import RunConfig

    config = RunConfig(method=method, options=dict(options), backbone=backbone, pretrained=pretrained, seeds=(1,))
    return config.to_dict()


def import_dassl(path: str, method: str, classnames, output: str, backbone: str | None = None,
                 pretrained: str | None = "auto", options: dict | None = None) -> dict:
    """Convert the Dassl checkpoint at `path` (trained by `method`'s official trainer) into a fastprompt
    checkpoint folder `output`; returns its manifest's imported_from entry. `output` must not exist yet or be
    an empty folder; nothing is left there when the import fails.

    backbone: the open_clip name the run used (None: ViT-B-16, except CoOp, whose file does not show it).
    pretrained: the weights recorded for evaluation ('auto': openai, as every official repo trains on OpenAI's
    CLIP, or none for a fastprompt tiny config)."""
    import fastprompt

    from ..backbone import inspect_clip
    from ..backbones import TINY_CONFIGS, create_clip

    if method not in _LAYOUTS:
        raise DasslImportError(f"no Dassl importer for method {method!r}; importable: {', '.join(IMPORTABLE)}")
    output = os.path.abspath(os.path.expanduser(output))
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise DasslImportError(f"output {output} already exists; give a new folder")
    state, epoch = read_dassl_checkpoint(path)  # a missing or foreign file is the first thing to hear about
    if backbone is None:
        if method == "coop":
            # CoOp saves its context alone, 512 wide for RN50 and ViT-B/16 alike: nothing in the file tells them apart.
            raise DasslImportError("a CoOp checkpoint does not show which CLIP it was trained on: name it"
                                   " (--backbone, backbone= in Python; e.g. ViT-B-16; an RN50 run's context has"
                                   " the same shape)")
        backbone = "ViT-B-16"
    if pretrained == "auto":
        pretrained = None if backbone in TINY_CONFIGS else "openai"
    clip = create_clip(backbone, pretrained=None)  # the shapes only; the weights load when the checkpoint is used
    _check_backbone(state, clip, backbone)
    layout = _LAYOUTS[method](state, inspect_clip(clip))
    whole = method in _WHOLE_MODEL
    used = set(layout.mapping.values())
    unknown = sorted(k for k in state if k not in used and not _droppable(k, whole))
    missing = sorted({k for k in used if k not in state})
    if missing or unknown:
        raise DasslImportError(f"{path} does not fit the official {method} trainer's layout: {len(missing)} missing"
                               f" {missing[:6]}, {len(unknown)} unknown {unknown[:6]}")
    merged = _merge_options(method, layout, options)
    try:
        model = fastprompt.build(method, clip, classnames, **merged)
    except (TypeError, ValueError) as error:
        raise DasslImportError(f"cannot build {method} for this checkpoint: {error}") from None
    own = model.method.state_dict()
    if set(own) != set(layout.mapping):  # a layout bug, or options that change the parameter set
        raise DasslImportError(f"{method} built with {layout.options} has parameters"
                               f" {sorted(set(own) ^ set(layout.mapping))[:6]} that the mapping does not cover")
    wrong = [f"{layout.mapping[k]} {tuple(state[layout.mapping[k]].shape)} vs {k} {tuple(v.shape)}"
             for k, v in own.items() if tuple(state[layout.mapping[k]].shape) != tuple(v.shape)]
    if wrong:
        raise DasslImportError(f"tensor shapes do not fit {method} on backbone {backbone!r}: " + "; ".join(wrong[:4]))
    model.method.load_state_dict({k: state[src].to(own[k].dtype) for k, src in layout.mapping.items()})
    record = {"file": os.path.abspath(path), "epoch": epoch, "trainer": method, "imported": now(),
              "mapping": dict(layout.mapping)}
    created = not os.path.exists(output)
    try:
        save_checkpoint(output, model, method, merged, backbone_record(model, backbone, pretrained),
                        config=_run_config(method, merged, backbone, pretrained), extra={"imported_from": record})
    except BaseException:  # a full disk or an interrupt: leave no half checkpoint behind
        if created:
            shutil.rmtree(output, ignore_errors=True)
        else:  # the empty folder the user gave stays, emptied again
            for name in os.listdir(output):
                written = os.path.join(output, name)
                if os.path.isdir(written):
                    shutil.rmtree(written, ignore_errors=True)
                else:
                    os.remove(written)
        raise
    return record


def parse_option(text: str) -> tuple[str, object]:
    """'key=value' -> (key, value); the value as JSON when it parses (numbers, true, null), else the string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise DasslImportError(f"--option {text!r}: write key=value, e.g. ctx_init=\"a photo of a\"")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


__all__ = ["IMPORTABLE", "DasslImportError", "import_dassl", "read_dassl_checkpoint"]
