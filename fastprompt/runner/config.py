"""The runner's typed configuration: one flat dataclass, overrides as `key=value`, files as JSON or YAML.

Values are data, never code: a `key=value` string is parsed by the field's declared type (int, float,
bool, str, optional, tuples), and a config file is read with `json.load` or `yaml.safe_load`. An unknown
key is an error that names it and suggests the closest valid key.

Method options (a method class's keyword arguments, `fastprompt.method_options(name)`) are written as
bare keys too (`n_ctx=4`, `reg_weight=0.2`); they are checked against the chosen method. Dataset
options (`fastprompt.data.dataset_options(name)`) are written `dataset.<option>=value`.

Precedence, lowest first: RunConfig defaults < the preset of (method, protocol, dataset, shots) <
config file < command-line overrides.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field

from ..keywords import closest

PROTOCOLS = ("b2n", "fewshot", "xd", "dg")
PRECISIONS = ("auto", "fp32", "bf16", "fp16-parity")
OPTIMIZERS = ("sgd", "adamw")


class ConfigError(ValueError):
    """A configuration value, key or combination is invalid; the message names it."""


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class RunConfig:
    """Everything one `fastprompt train` run needs. Field help texts are shown by `--dry-run`."""

    # --- what to train and where it is evaluated ----------------------------------------------------
    method: str = _help("prompt method (fastprompt.METHODS)", default="coop")
    options: dict = _help("method options (keyword arguments of the method class)", default_factory=dict)
    protocol: str = _help("b2n (base-to-novel), fewshot, xd (cross-dataset), dg (domain generalisation)", default="b2n")
    dataset: str = _help("training dataset (fastprompt.data names)", default="procedural")
    root: str | None = _help("folder holding one folder per dataset (CoOp layout); none for procedural", default=None)
    dataset_options: dict = _help("options of the dataset loader (`dataset.<name>=value`)", default_factory=dict)
    targets: tuple[str, ...] | None = _help(
        "xd/dg evaluation targets (default: the protocol's standard list)", default=None
    )
    shots: int = _help("training images per class", default=16)
    seeds: tuple[int, ...] = _help("few-shot sampling and training seeds; one model per seed", default=(1, 2, 3))
    # --- backbone and numerics ------------------------------------------------------------------------
    backbone: str = _help("open_clip model name, or 'tiny'/'small' (random-weight test configs)", default="ViT-B-16")
    pretrained: str | None = _help("open_clip pretrained tag or local checkpoint file; none = random", default="openai")
    precision: str = _help(
        "auto (bf16 on GPU, fp32 on CPU), fp32, bf16 (bf16 frozen weights + autocast, fp32 prompts), fp16-parity"
        " (fp16 weights and activations, no autocast, fp32 prompt masters: the research repos' numerics)",
        default="auto",
    )
    device: str = _help("auto (cuda if available), cpu, cuda, cuda:N", default="auto")
    # --- optimisation (METHODS.md §2) -----------------------------------------------------------------
    optimizer: str = _help("sgd or adamw", default="sgd")
    lr: float = _help("base learning rate (cosine over the epochs)", default=0.002)
    weight_decay: float = _help("weight decay", default=5e-4)
    momentum: float = _help("SGD momentum", default=0.9)
    epochs: int = _help("training epochs (the final-epoch weights are evaluated)", default=5)
    warmup_epochs: int = _help("constant warm-up epochs at warmup_lr", default=1)
    warmup_lr: float = _help("warm-up learning rate", default=1e-5)
    batch_size: int = _help("training batch size", default=4)
    accumulate: int = _help("gradient accumulation: split each batch into this many micro-batches, one update per"
                            " batch (same update, less memory, the text tower runs once per micro-batch)", default=1)
    eval_batch_size: int = _help("evaluation batch size", default=100)
    crop_scale: tuple[float, float] = _help("RandomResizedCrop scale range", default=(0.08, 1.0))
    gpa: bool = _help("PromptSRC Gaussian prompt aggregation (gpa_mean/gpa_std are method options)", default=False)
    max_bad_steps: int = _help("non-finite losses in a row before the run stops", default=5)
    shard_text: bool = _help("under torchrun, each process encodes the text of C/N classes and the features are"
                             " all-gathered (fastprompt.parallel.class_shard: pays from about 1,000 classes);"
                             " no effect with one process", default=False)
    kernels: str = _help(
        "auto (fastprompt.patch: fused blocks + packed text; Triton kernels on CUDA), eager (the unpatched"
        " reference path), or an attention backend to patch with: triton, xformers, sdpa",
        default="auto",
    )
    # --- data loading ---------------------------------------------------------------------------------
    num_workers: int = _help("data-loader worker processes; -1 = automatic", default=-1)
    data_on_device: object = _help(
        "decode the few-shot training set once onto the device and augment there (crop, flip, normalise):"
        " true, false, or auto (on with CUDA; elsewhere a DataLoader with workers, pinned memory and prefetch)",
        default="auto",
    )
    device_cache_side: int | None = _help(
        "with data_on_device: shrink images so the shorter side is at most this before caching (none = as is)",
        default=None,
    )
    eval_cache: object = _help(
        "keep a test split's decoded pixels in host memory after its first evaluation, for the next seed's or"
        " epoch's: true (within 3/4 of the available memory), false, or auto (within half of it, when the process"
        " evaluates a split more than once)",
        default="auto",
    )
    # --- outputs --------------------------------------------------------------------------------------
    output_dir: str | None = _help("run folder (default runs/<method>-<protocol>-<dataset>-<shots>shot)", default=None)
    save_every: int = _help("epochs between resumable training states", default=1)
    eval_every: int = _help("also evaluate the targets after every N-th epoch (the epoch's own weights; novel"
                            " accuracy per epoch), logged and kept in results.json's history; 0: only at the end",
                            default=0)

    def to_dict(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> RunConfig:
        config = cls()
        for key, value in values.items():
            set_field(config, key, value)
        return config

    def resolved_output_dir(self) -> str:
        if self.output_dir:
            return os.path.abspath(os.path.expanduser(self.output_dir))
        name = f"{self.method}-{self.protocol}-{self.dataset}-{self.shots}shot"
        return os.path.abspath(os.path.join("runs", name))


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_HINTS = typing.get_type_hints(RunConfig)


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


# --- parsing values by type ----------------------------------------------------------------------------
def _is_optional(hint) -> tuple[bool, object]:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return True, rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]  # noqa: UP007 (built at run time)
    return False, hint


def _parse_scalar(text: str, kind, key: str):
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {text!r}")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {text!r}") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {text!r}") from None
    if kind is str:
        return text
    return _parse_untyped(text)


def _parse_untyped(text: str):
    """A value whose type is not declared: JSON literal if it is one (numbers, true/false/null), else a string."""
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, int | float | bool) else text


def coerce(value, hint, key: str):
    """`value` (a string from the command line, or a JSON/YAML value) converted to type `hint`."""
    optional, inner = _is_optional(hint)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null") and optional):
        if not optional:
            raise ConfigError(f"{key} cannot be none")
        return None
    origin = typing.get_origin(inner)
    if origin is tuple:
        args = typing.get_args(inner)
        items = [s for s in value.split(",") if s.strip()] if isinstance(value, str) else value
        if isinstance(items, int | float):
            items = [items]
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{key}: expected a comma-separated list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(item, args[0], key) for item in items)
        if len(items) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(items)} ({value!r})")
        return tuple(coerce(item, arg, key) for item, arg in zip(items, args, strict=True))
    if inner is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(value, str):
        return _parse_scalar(value, inner, key)
    if inner is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if inner is object or isinstance(value, inner) and not (inner is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key}: expected {getattr(inner, '__name__', inner)}, got {value!r}")


def data_on_device(config: RunConfig, device) -> bool:
    """Whether the training set is held on the device: `data_on_device`, with auto = on a CUDA device."""
    if config.data_on_device == "auto":
        return str(device).startswith("cuda")
    return bool(config.data_on_device)


def set_field(config: RunConfig, key: str, value) -> None:
    if key not in FIELDS:
        raise ConfigError(unknown_key_message(key, list(FIELDS)))
    value = coerce(value, _HINTS[key], key)
    if key == "root" and value is not None:
        # Absolute as soon as it is set: the run folder keeps it, and `eval` from another folder reads it back.
        value = os.path.abspath(os.path.expanduser(value))
    setattr(config, key, value)


def unknown_key_message(key: str, valid: list[str], what: str = "config key") -> str:
    near = closest(key, valid)
    hint = f"; did you mean {near!r}?" if near else ";"
    kind = {"config key": "keys"}.get(what, what + "s")  # "method" -> "Valid methods", as the user wrote it
    return f"unknown {what} {key!r}{hint} Valid {kind}: {', '.join(sorted(valid))}"


# --- overrides -----------------------------------------------------------------------------------------
def parse_overrides(items: list[str]) -> dict[str, str]:
    """['lr=0.002', 'n_ctx=4'] -> {'lr': '0.002', 'n_ctx': '4'}; a repeated key is an error."""
    result: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        if key in result:
            raise ConfigError(f"key {key!r} is given twice ({key}={result[key]} and {item})")
        result[key] = value
    return result


def load_config_file(path: str) -> dict:
    """A flat mapping of config keys from a .json, .yaml or .yml file (parsed as data, never executed)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found")
    from ..data.files import read_user_text

    text = read_user_text(path, "config file", ConfigError)
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ConfigError(
                f"{path}: reading YAML needs PyYAML (pip install pyyaml); or write the file as JSON"
            ) from None
        try:
            content = yaml.safe_load(text)
        except yaml.YAMLError as error:
            # PyYAML's message spans several lines (context, a caret drawing); one line: the problem and where.
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    else:
        try:
            content = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"config file {path} is not valid JSON: {error}") from None
    if not isinstance(content, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    flat: dict = {}
    for key, value in content.items():
        if key in ("options", "dataset_options") and isinstance(value, dict):
            prefix = "" if key == "options" else "dataset."
            flat.update({f"{prefix}{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _set_dataset_option(config: RunConfig, key: str, value, source: str) -> None:
    """`dataset.<option>=value` converted to the type the dataset's loader declares; an option the dataset does
    not take is named here, with the closest one, before anything is read (and before a dry run prints)."""
    from ..data import DatasetError
    from ..data.registry import dataset_option_types

    option = key[len("dataset."):]
    try:
        declared = dataset_option_types(config.dataset)
    except DatasetError:  # an unknown dataset: resolve_config and check_config name it
        declared = None
    if declared is None:
        config.dataset_options[option] = _parse_untyped(value) if isinstance(value, str) else value
        return
    if option not in declared:
        near = closest(option, declared)
        hint = f"; did you mean 'dataset.{near}'?" if near else ";"
        raise ConfigError(f"{source}: dataset {config.dataset!r} has no option {option!r}{hint} its options:"
                          f" {', '.join(declared) or 'none'}")
    config.dataset_options[option] = coerce(value, declared[option], key)


def apply_values(config: RunConfig, values: dict, source: str) -> None:
    """Apply {key: value} onto `config`: fields, bare method options and `dataset.<option>` keys."""
    from ..methods import METHODS, option_types as declared_option_types

    if config.method.lower().replace("-", "_") not in METHODS:
        raise ConfigError(unknown_key_message(config.method, sorted(METHODS), "method"))
    option_types = declared_option_types(config.method)
    for key, value in values.items():
        if key in ("method", "protocol", "dataset", "shots"):
            continue  # chosen before the preset (resolve_config)
        if key.startswith("dataset."):
            _set_dataset_option(config, key, value, source)
        elif key in FIELDS:
            set_field(config, key, value)
        elif key in option_types:
            config.options[key] = coerce(value, option_types[key], key)
        else:
            valid = [*FIELDS, *option_types]
            raise ConfigError(
                f"{source}: " + unknown_key_message(key, valid) + f" (method {config.method!r} options: "
                f"{', '.join(option_types) or 'none'}; dataset options are written dataset.<name>=value)"
            )


def check_config(config: RunConfig) -> None:
    """Validate values and combinations; every message names the key."""
    from ..methods import METHODS

    if config.method not in METHODS:
        raise ConfigError(unknown_key_message(config.method, sorted(METHODS), "method"))
    choices = {"protocol": PROTOCOLS, "precision": PRECISIONS, "optimizer": OPTIMIZERS}
    for key, allowed in choices.items():
        if getattr(config, key) not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {getattr(config, key)!r}")
    for key, (low, high, closed_high) in _RANGES.items():
        _check_number(key, getattr(config, key), low, high, closed_high)
    if config.device_cache_side is not None:
        _check_number("device_cache_side", config.device_cache_side, 1, None)
    for value in config.crop_scale:
        _check_number("crop_scale", value, None, None)
    if config.warmup_epochs >= config.epochs > 0:
        raise ConfigError(
            f"warmup_epochs={config.warmup_epochs} leaves no cosine epoch in epochs={config.epochs};"
            " lower warmup_epochs"
        )
    if config.accumulate > config.batch_size:
        raise ConfigError(f"accumulate={config.accumulate} splits a batch of batch_size={config.batch_size} into more"
                          " micro-batches than it has images; lower accumulate")
    if not config.seeds:
        raise ConfigError("seeds must list at least one seed")
    if len(set(config.seeds)) != len(config.seeds):
        raise ConfigError(f"seeds repeat a value: {config.seeds}")
    low, high = config.crop_scale
    if not 0 < low <= high <= 1:
        raise ConfigError(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {config.crop_scale}")
    if config.targets is not None and config.protocol not in ("xd", "dg"):
        raise ConfigError(f"targets are for the xd and dg protocols, not {config.protocol!r}")
    for name in ("data_on_device", "eval_cache"):  # typed loosely (a bool or 'auto'): normalise the spellings
        value = getattr(config, name)
        if isinstance(value, str):
            spelled = value.strip().lower()
            value = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False,
                     "off": False}.get(spelled, spelled)
            setattr(config, name, value)
        if value not in (True, False, "auto"):
            raise ConfigError(f"{name} must be true, false or auto, got {value!r}")
    if config.device_cache_side is not None and config.data_on_device is False:
        raise ConfigError("device_cache_side is set but data_on_device is false; set data_on_device=true")
    # Protocols that score other classes (b2n's novel half, xd's other datasets, dg's ImageNet-A/-R subsets).
    if config.options.get("class_specific") and (config.protocol in ("b2n", "xd") or
                                                 (config.protocol == "dg" and config.targets is None)):
        raise ConfigError(f"class_specific=true trains one context per training class, which protocol"
                          f" {config.protocol} would use on other classes; use protocol fewshot, or class_specific=false")
    if config.gpa and config.method != "promptsrc":
        raise ConfigError(f"gpa (Gaussian prompt aggregation) is PromptSRC's; method is {config.method!r}")
    if config.dataset == "procedural" and config.root is not None:
        raise ConfigError("the procedural dataset is drawn in memory and takes no root; remove --root (or root=)")
    check_method_options(config.method, config.options)
    _check_names(config)
    _check_backbone_fits(config)


def configured_vision(backbone: str) -> dict | None:
    """The vision_cfg of `backbone` read from its config without building it (a list of `layers`: a CNN tower);
    None where that is not known offline (hf-hub: names, unknown names)."""
    import open_clip

    from ..backbones import TINY_CONFIGS

    if backbone in TINY_CONFIGS:
        return TINY_CONFIGS[backbone]["vision_cfg"]
    if backbone in open_clip.list_models():  # local configs only: get_model_config fetches hf-hub: names
        return (open_clip.get_model_config(backbone) or {}).get("vision_cfg", {})
    return None


def _check_backbone_fits(config: RunConfig) -> None:
    """A method that prompts vision on a CNN backbone (RN50 family), or weights trained on another normalisation
    (fastprompt.backbones.tag_problem), refused from the backbone's config: before any data are read, in a dry run
    and for every run of a sweep (building the model refuses them too, for backbones whose config is not known
    offline)."""
    from ..backbone import cnn_refusal
    from ..methods import method_class

    vision = configured_vision(config.backbone)
    if vision is not None and isinstance(vision.get("layers"), (tuple, list)) \
            and method_class(config.method).prompts_vision(config.options):
        raise ConfigError(f"backbone {config.backbone!r}: {cnn_refusal(config.method)}")
    if vision is not None:  # a known open_clip name (or a tiny config): its tags are in open_clip's table
        from ..backbones import tag_problem

        problem = tag_problem(config.backbone, config.pretrained)
        if problem is not None:
            raise ConfigError(f"backbone={config.backbone!r}, pretrained={config.pretrained!r}: {problem}")


def _check_names(config: RunConfig) -> None:
    """kernels and device spelled as the runner knows them; whether this machine has the device is the run's
    check (a dry run may be made on a machine without the GPU the run will use)."""
    from ..ops.backends import BACKENDS

    kernels = ("auto", *BACKENDS)  # eager is one of BACKENDS: the unpatched reference
    if config.kernels not in kernels:
        near = closest(str(config.kernels), kernels)
        hint = f" (did you mean {near!r}?)" if near else ""
        raise ConfigError(f"kernels must be one of {', '.join(kernels)}, got {config.kernels!r}{hint}")
    kind, _, index = str(config.device).partition(":")
    if config.device != "auto" and (kind not in ("cpu", "cuda") or (index and not index.isdigit())):
        raise ConfigError(f"device={config.device!r}: the runner runs on auto, cpu, cuda or cuda:N")


# Numeric config keys: (lowest, highest, highest allowed?); None = unbounded. Every value must also be finite:
# a NaN passes every comparison, and lr=nan trained an all-NaN checkpoint that was reported complete.
_RANGES = {
    "shots": (1, None, True), "batch_size": (1, None, True), "eval_batch_size": (1, None, True), "accumulate": (1, None, True),
    "max_bad_steps": (1, None, True), "save_every": (1, None, True), "eval_every": (0, None, True),
    "epochs": (0, None, True),
    "warmup_epochs": (0, None, True), "num_workers": (-1, None, True),
    "lr": (0, None, True), "warmup_lr": (0, None, True), "weight_decay": (0, None, True),
    "momentum": (0, 1, False),
}
_ABOVE_LOW = ("lr", "gpa_std")  # lowest value excluded: a zero lr trains nothing, a zero std divides by zero


def _check_number(key: str, value, low, high, closed_high: bool = True) -> None:
    import math

    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")
    too_low = low is not None and (value <= low if key in _ABOVE_LOW else value < low)
    too_high = high is not None and (value > high if closed_high else value >= high)
    if too_low or too_high:
        lower = "" if low is None else (f"> {low}" if key in _ABOVE_LOW else f">= {low}")
        upper = "" if high is None else (f"<= {high}" if closed_high else f"< {high}")
        raise ConfigError(f"{key} must be {' and '.join(b for b in (lower, upper) if b)}, got {value}")


def check_method_options(method: str, options: dict) -> None:
    """Every numeric method option finite, and in range where the option has one (n_ctx >= 1, ...); every option
    with a fixed set of values one of them (the method's own `option_choices`, which its constructor checks only
    when the model is built, after the data is read)."""
    from ..methods import OPTION_RANGES, method_class

    choices = method_class(method).option_choices
    for name, value in options.items():
        if name in choices and value not in choices[name]:
            raise ConfigError(f"{name} must be one of {', '.join(map(str, choices[name]))}, got {value!r}"
                              f" (an option of method {method})")
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        low, high = OPTION_RANGES.get(name, (None, None))
        _check_number(name, value, low, high)


# --- building the effective config ---------------------------------------------------------------------
@dataclass
class ResolvedConfig:
    config: RunConfig
    preset: RunConfig
    preset_name: str
    notes: list = field(default_factory=list)  # one line per option overridden by another (shown and logged)

    def diff(self) -> dict[str, tuple]:
        """key -> (preset value, effective value) for every key that differs from the preset."""
        base, now = self.preset.to_dict(), self.config.to_dict()
        changes = {}
        for key in now:
            if key in ("options", "dataset_options"):
                prefix = "" if key == "options" else "dataset."
                for name in sorted(set(base[key]) | set(now[key])):
                    if base[key].get(name) != now[key].get(name):
                        changes[prefix + name] = (base[key].get(name), now[key].get(name))
            elif base[key] != now[key]:
                changes[key] = (base[key], now[key])
        return changes


def resolve_config(file_values: dict | None = None, overrides: dict | None = None) -> ResolvedConfig:
    """Defaults < preset < file < overrides. method/protocol/dataset/shots are read first: they pick the preset."""
    from .presets import preset

    file_values, overrides = dict(file_values or {}), dict(overrides or {})
    choose = RunConfig()
    for source in (file_values, overrides):
        for key in ("method", "protocol", "dataset", "shots"):
            if key in source:
                set_field(choose, key, source[key])
    choose.method = choose.method.lower().replace("-", "_")
    if choose.dataset != "procedural":
        from ..data import resolve_dataset_name

        try:
            choose.dataset = resolve_dataset_name(choose.dataset)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    name, values = preset(choose.method, choose.protocol, choose.dataset, choose.shots)
    base = RunConfig(method=choose.method, protocol=choose.protocol, dataset=choose.dataset, shots=choose.shots)
    apply_values(base, values, f"preset {name}")
    config = RunConfig.from_dict(base.to_dict())
    apply_values(config, file_values, "config file")
    apply_values(config, overrides, "override")
    check_config(config)
    notes = _reconcile_context(config, base.options, set(file_values) | set(overrides))
    return ResolvedConfig(config, base, name, notes)


# Methods whose ctx_init, when set, fixes the context length at its token count (n_ctx is then not used), and
# methods that initialise their first n_ctx context tokens from ctx_init's words (n_ctx must not exceed them).
_CTX_INIT_SETS_LENGTH = ("coop", "cocoop")
_CTX_INIT_INITIALISES = ("maple", "mcpl")


def _reconcile_context(config: RunConfig, preset_options: dict, user_keys: set) -> list[str]:
    """Make n_ctx and ctx_init agree in the recorded config, so that no option is recorded as if used when the
    method ignores it. A value the user gave wins over the preset's (one note line says what was dropped); two
    user values that contradict each other are an error. Returns the note lines."""
    from ..methods import method_options

    method = config.method
    if method not in _CTX_INIT_SETS_LENGTH + _CTX_INIT_INITIALISES:
        return []
    options = config.options
    ctx_init = options.get("ctx_init", method_options(method)["ctx_init"])
    tokens = _ctx_init_tokens(ctx_init)
    if tokens is None:
        return []
    n_ctx = options.get("n_ctx", method_options(method)["n_ctx"])
    if method in _CTX_INIT_INITIALISES:
        if n_ctx > tokens:
            raise ConfigError(f"n_ctx={n_ctx} but ctx_init={ctx_init!r} has {tokens} tokens: {method} initialises"
                              f" its n_ctx context tokens from ctx_init's words; use n_ctx <= {tokens} or a longer"
                              " ctx_init")
        return []
    if n_ctx == tokens:
        return []
    if "n_ctx" in user_keys and "ctx_init" in user_keys:
        raise ConfigError(f"n_ctx={n_ctx} and ctx_init={ctx_init!r} conflict: {method} takes the context length from"
                          f" ctx_init ({tokens} tokens); give one of them (ctx_init=none for {n_ctx} random tokens)")
    if "n_ctx" in user_keys:
        source = "the preset's" if preset_options.get("ctx_init") else f"{method}'s default"
        options["ctx_init"] = None
        return [f"n_ctx={n_ctx} replaces {source} ctx_init={ctx_init!r} (which fixes the context at its {tokens}"
                f" tokens): the context is {n_ctx} randomly initialised tokens"]
    if "n_ctx" not in options:
        return []  # the method's default n_ctx: not recorded, so nothing claims it was used
    options["n_ctx"] = tokens
    return [f"ctx_init={ctx_init!r} sets the context length to its {tokens} tokens; the preset's n_ctx={n_ctx} is"
            " not used"]


def _context_length_from_init(config: RunConfig) -> int | None:
    """The context length a CoOp/CoCoOp config really trains with when ctx_init fixes it and n_ctx is left at
    the method's default (which the method then does not use); None otherwise."""
    from ..methods import method_options

    if config.method not in _CTX_INIT_SETS_LENGTH or "n_ctx" in config.options:
        return None
    return _ctx_init_tokens(config.options.get("ctx_init", method_options(config.method)["ctx_init"]))


def _ctx_init_tokens(ctx_init: str | None) -> int | None:
    """How many tokens ctx_init's words take (the context length they give or cap); None without ctx_init."""
    if not ctx_init:
        return None
    from ..model import _default_tokenizer

    return len(_default_tokenizer().encode(ctx_init))


def format_config(resolved: ResolvedConfig) -> str:
    """The effective config, one key per line, and its differences from the preset."""
    from ..methods import method_options

    lines = [f"# effective config (preset {resolved.preset_name})"]
    defaults = method_options(resolved.config.method)
    for key, value in resolved.config.to_dict().items():
        if key == "options":
            length_from_init = _context_length_from_init(resolved.config)
            for name in defaults:
                if name in value:
                    lines.append(f"{name} = {json.dumps(value[name])}")
                elif name == "n_ctx" and length_from_init not in (None, defaults[name]):
                    lines.append(f"n_ctx = {length_from_init}  # ctx_init's token count (the method's default,"
                                 f" {defaults[name]}, is not used)")
                else:
                    lines.append(f"{name} = {json.dumps(defaults[name])}  # method default")
        elif key == "dataset_options":
            lines += [f"dataset.{k} = {json.dumps(v)}" for k, v in sorted(value.items())]
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    changes = resolved.diff()
    lines += [f"# note: {note}" for note in resolved.notes]
    lines.append(f"# differences from the preset: {len(changes) or 'none'}")
    for key, (before, after) in changes.items():
        lines.append(f"{key}: {json.dumps(before)} -> {json.dumps(after)}")
    return "\n".join(lines)
