"""Training run configuration: named presets, files, and `key=value` overrides.

A run is `TrainConfig`; its `model` is a `ModelConfig` whose vocab_size and max_seq_len are
taken from the data (the mix's loader) when training starts. Presets:

- `tiny`: unit tests and CI (a ~0.2M-parameter model, a handful of steps).
- `demo`: the CPU demo (64 px frames -> 8x8 = 64 tokens, 16-frame clips ~1k tokens, ~1.9M params).
- `base`, `large`, `1b`: the paper's models at ~1M tokens per step, peak lr 3e-4.
- `base-256`, `large-256`, `1b-256`: the coarse-to-fine second stage (32x32 grid, RoPE base 50 000),
  initialised from a 128 px checkpoint with `init_from=...`.
- `large-gpt2`, `large-mamba`: the architecture ablation at ~280M; `demo-*` at the demo's size, `tiny-*` for CI.
- `a1` ... `a6`: the μP width/depth sweep (8 heads, widths 256..1024, base width 256, lr 2^-7).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from trainer.model import PRESETS as MODEL_PRESETS
from trainer.model import SWEEP_SIZES, ModelConfig

__all__ = ["TrainConfig", "PRESETS", "load_config", "apply_overrides", "config_to_dict", "config_from_dict"]

_DTYPES = ("auto", "fp32", "bf16")
_PARALLEL = ("ddp", "fsdp")
_DEVICES = ("auto", "cpu", "cuda")
_VERIFY = ("auto", "sha256", "off")  # = pipeline.mix.access.VERIFY_MODES (trainer config stays import-light)


@dataclass
class TrainConfig:
    """One pre-training run. Every field can be overridden on the command line as key=value."""

    name: str = "tiny"
    model: ModelConfig = field(default_factory=lambda: dataclasses.replace(MODEL_PRESETS["tiny"]))
    # Batch: tokens per optimizer step across all ranks (rounded down to whole micro-batches),
    # or a fixed number of sequences with global_batch (takes precedence when set).
    batch_tokens: int = 4096
    global_batch: int | None = None
    micro_batch: int = 4  # sequences per rank per forward/backward
    max_steps: int = 20
    # Optimizer and schedule: AdamW, linear warmup then cosine decay to lr * min_lr_ratio.
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    seed: int = 0
    # Execution.
    device: str = "auto"  # auto: cuda when available
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    activation_checkpointing: bool = False
    parallel: str = "ddp"  # strategy when world size > 1: ddp or fsdp (FSDP2 fully_shard)
    num_workers: int = 0  # loader worker processes
    # Data integrity: auto = per-frame checksums on what is read from remote shards (sha256 of
    # local ones once per process); sha256 = whole files once per process; off = none.
    data_verify: str = "auto"
    # Checkpoints, logs, validation.
    ckpt_every: int = 10
    keep_last: int = 2
    log_every: int = 1
    val_every: int = 0  # 0: no validation
    val_batches: int = 2  # micro-batches per rank per validation
    val_split: str = "val"
    position_loss: bool = True  # per-position loss JSON + PNG at each validation
    tensorboard: bool = True
    progress: bool = True
    peak_flops: float | None = None  # per device; None: look up the GPU in a table (none on CPU)
    init_from: str | None = None  # checkpoint whose model weights start the run (new optimizer)
    # Leave early with a checkpoint (for time-limited allocations); re-running continues the schedule.
    exit_after_steps: int | None = None  # steps run by this invocation
    exit_after_minutes: float | None = None  # wall-clock minutes of this invocation
    # Patch models (model.input=patches, Table 3): the pixel datasets beside the mix's token datasets,
    # NAME=DIR[,NAME=DIR] per mix source (or DIR for one source); see trainer/data/pixels.py.
    pixels: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig.from_dict(self.model)

        def bad(name: str, fix: str) -> ValueError:
            return ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid: {fix}")

        for name in ("batch_tokens", "micro_batch", "max_steps", "keep_last", "log_every", "val_batches"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "use a positive integer")
        for name in ("warmup_steps", "ckpt_every", "val_every", "num_workers", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(name, "use a non-negative integer (0 disables where applicable)")
        if self.global_batch is not None and (not isinstance(self.global_batch, int) or self.global_batch < 1):
            raise bad("global_batch", "use a positive number of sequences, or None to derive it from batch_tokens")
        if self.keep_last < 2:
            raise bad("keep_last", "keep at least 2 checkpoints so a crash while saving never loses the last one")
        if self.warmup_steps > self.max_steps:
            raise bad("warmup_steps", f"must not exceed max_steps={self.max_steps}")
        if not (self.lr > 0):
            raise bad("lr", "use a positive learning rate such as 3e-4")
        if not (0 <= self.min_lr_ratio <= 1):
            raise bad("min_lr_ratio", "use a fraction of lr in [0, 1], e.g. 0.1")
        if not (self.weight_decay >= 0):
            raise bad("weight_decay", "use a non-negative value such as 0.1")
        for name in ("beta1", "beta2"):
            if not (0 <= getattr(self, name) < 1):
                raise bad(name, "use a value in [0, 1), e.g. beta1=0.9 beta2=0.95")
        if not (self.eps > 0):
            raise bad("eps", "use a small positive value such as 1e-8")
        if not (self.grad_clip >= 0):
            raise bad("grad_clip", "use a positive max norm such as 1.0, or 0 to disable clipping")
        if self.dtype not in _DTYPES:
            raise bad("dtype", f"choose one of {_DTYPES}")
        if self.parallel not in _PARALLEL:
            raise bad("parallel", f"choose one of {_PARALLEL}")
        if self.data_verify not in _VERIFY:
            raise bad("data_verify", f"choose one of {_VERIFY}")
        if self.device not in _DEVICES:
            raise bad("device", f"choose one of {_DEVICES}")
        if self.peak_flops is not None and not (self.peak_flops > 0):
            raise bad("peak_flops", "use the device's peak FLOP/s, e.g. 989e12 for an H100 in bf16, or None")
        if self.exit_after_steps is not None and (not isinstance(self.exit_after_steps, int) or self.exit_after_steps < 1):
            raise bad("exit_after_steps", "use a positive number of steps, or None to run to max_steps")
        if self.exit_after_minutes is not None and not (self.exit_after_minutes > 0):
            raise bad("exit_after_minutes", "use a positive number of minutes, or None")
        if not self.val_split:
            raise bad("val_split", "name the mix's held-out split, e.g. val")


def _preset(name: str, model: str, **kw) -> TrainConfig:
    return TrainConfig(name=name, model=dataclasses.replace(MODEL_PRESETS[model]), **kw)


PRESETS: dict[str, TrainConfig] = {
    "tiny": _preset(
        "tiny", "tiny", batch_tokens=4096, micro_batch=2, max_steps=20, lr=1e-3, warmup_steps=2,
        ckpt_every=10, val_every=10, val_batches=1,
    ),
    "demo": _preset(
        "demo", "demo", batch_tokens=8192, micro_batch=4, max_steps=120, lr=2e-3, warmup_steps=12,
        ckpt_every=40, val_every=40, val_batches=4, min_lr_ratio=0.1,
    ),
    "base": _preset(
        "base", "base", batch_tokens=1 << 20, micro_batch=8, max_steps=100_000, lr=3e-4, warmup_steps=2000,
        ckpt_every=1000, val_every=1000, val_batches=8, keep_last=3, progress=True,
    ),
    "large": _preset(
        "large", "large", batch_tokens=1 << 20, micro_batch=8, max_steps=100_000, lr=3e-4, warmup_steps=2000,
        ckpt_every=1000, val_every=1000, val_batches=8, keep_last=3,
    ),
    "1b": _preset(
        "1b", "1b", batch_tokens=1 << 20, micro_batch=4, max_steps=100_000, lr=3e-4, warmup_steps=2000,
        ckpt_every=1000, val_every=1000, val_batches=8, keep_last=3, parallel="fsdp",
        activation_checkpointing=True,
    ),
    # Coarse to fine: 256 px frames (32x32 tokens) with RoPE base 50 000, from a 128 px checkpoint.
    "base-256": TrainConfig(
        name="base-256", model=dataclasses.replace(MODEL_PRESETS["base"], rope_theta=50000.0),
        batch_tokens=1 << 20, micro_batch=2, max_steps=10_000, lr=1e-4, warmup_steps=500,
        ckpt_every=1000, val_every=1000, val_batches=8, keep_last=3, activation_checkpointing=True,
    ),
    "large-256": TrainConfig(
        name="large-256", model=dataclasses.replace(MODEL_PRESETS["large"], rope_theta=50000.0),
        batch_tokens=1 << 20, micro_batch=2, max_steps=10_000, lr=1e-4, warmup_steps=500,
        ckpt_every=1000, val_every=1000, val_batches=8, keep_last=3, activation_checkpointing=True,
    ),
    "1b-256": TrainConfig(
        name="1b-256", model=dataclasses.replace(MODEL_PRESETS["1b"], rope_theta=50000.0),
        batch_tokens=1 << 20, micro_batch=1, max_steps=10_000, lr=1e-4, warmup_steps=500,
        ckpt_every=1000, val_every=1000, val_batches=8, keep_last=3, parallel="fsdp", activation_checkpointing=True,
    ),
}
# Architecture ablation (Table 6): the large recipe with another backbone; tiny ones for CI.
for _arch in ("gpt2", "mamba"):
    PRESETS[f"large-{_arch}"] = dataclasses.replace(
        PRESETS["large"], name=f"large-{_arch}", model=dataclasses.replace(MODEL_PRESETS[f"large-{_arch}"]))
    for _size in ("tiny", "demo"):
        PRESETS[f"{_size}-{_arch}"] = dataclasses.replace(
            PRESETS[_size], name=f"{_size}-{_arch}", model=dataclasses.replace(MODEL_PRESETS[f"{_size}-{_arch}"]))
# Tokenizer ablation (Table 3): the large / tiny / demo recipes with patch input (trainer/patches.py); the
# run also needs pixels=... (the pixel datasets beside the mix's token datasets, trainer/data/pixels.py).
for _size in ("tiny", "demo", "large"):
    for _arm in ("patch", "patch-dvae"):
        PRESETS[f"{_size}-{_arm}"] = dataclasses.replace(
            PRESETS[_size], name=f"{_size}-{_arm}", model=dataclasses.replace(MODEL_PRESETS[f"{_size}-{_arm}"]))
# Width/depth sweep under μP (Figures 9, 11): the paper's optimum lr 2^-7 at every width, ~0.5M tokens a step.
for _name in SWEEP_SIZES:
    PRESETS[_name] = _preset(
        _name, _name, batch_tokens=1 << 19, micro_batch=8, max_steps=20_000, lr=2.0**-7, warmup_steps=1000,
        ckpt_every=1000, val_every=500, val_batches=8, keep_last=3,
    )


def config_to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> TrainConfig:
    """Build from a dict; `preset` (optional) names the starting point, other keys override it."""
    d = dict(d)
    base = d.pop("preset", None)
    start = dataclasses.replace(_get_preset(base)) if base else TrainConfig()
    flat = []
    for k, v in d.items():
        if k == "model" and isinstance(v, dict):
            flat += [(f"model.{mk}", mv) for mk, mv in v.items()]
        else:
            flat.append((k, v))
    return _apply(start, flat)


def _get_preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown config preset {name!r}{hint}; choose one of {sorted(PRESETS)} or a .json/.yaml file")
    p = PRESETS[name]
    return dataclasses.replace(p, model=dataclasses.replace(p.model))


def load_config(name_or_file: str, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """A preset name or a JSON/YAML file (keys as TrainConfig fields, optional `preset`), then overrides."""
    path = Path(name_or_file)
    if name_or_file in PRESETS:
        cfg = _get_preset(name_or_file)
    elif path.suffix in (".json", ".yaml", ".yml"):
        if not path.exists():
            raise ValueError(f"config file {path} does not exist; pass a preset ({sorted(PRESETS)}) or a file")
        text = path.read_text()
        if path.suffix == ".json":
            doc = json.loads(text)
        else:
            import yaml

            doc = yaml.safe_load(text)
        if not isinstance(doc, dict):
            raise ValueError(f"config file {path} must hold a mapping of TrainConfig fields")
        cfg = config_from_dict(doc)
    else:
        cfg = _get_preset(name_or_file)  # raises with the list of presets
    return apply_overrides(cfg, overrides)


def _parse_value(raw: str):
    low = raw.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _coerce(owner: str, name: str, typ, value):
    """Convert an override to the field's declared type, or raise naming the field."""
    hint = typ if not isinstance(typ, str) else None
    args = typing.get_args(hint) if hint is not None else ()
    allowed = [a for a in args if a is not type(None)] if args else [hint]
    if value is None:
        if type(None) in args:
            return None
        raise ValueError(f"{owner}.{name}=None is invalid: this field needs a {allowed[0].__name__}")
    for t in allowed:
        if t is bool:
            if isinstance(value, bool):
                return value
            continue
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, (str, int, float)):
            return str(value)
        if t is dict and isinstance(value, dict):
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ValueError(f"{owner}.{name}={value!r} is invalid: expected {names}")


def _apply(cfg: TrainConfig, items: list[tuple[str, object]]) -> TrainConfig:
    train_hints = typing.get_type_hints(TrainConfig)
    model_hints = typing.get_type_hints(ModelConfig)
    top, model = {}, {}
    for key, value in items:
        if key.startswith("model."):
            sub = key[len("model."):]
            if sub not in model_hints:
                close = difflib.get_close_matches(sub, model_hints, n=1)
                hint = f"; did you mean model.{close[0]}?" if close else ""
                raise ValueError(f"unknown override {key!r}{hint} (model fields: {sorted(model_hints)})")
            model[sub] = _coerce("ModelConfig", sub, model_hints[sub], value)
        elif key == "model" and isinstance(value, str):
            if value not in MODEL_PRESETS:
                raise ValueError(f"TrainConfig.model={value!r} is invalid: choose one of {sorted(MODEL_PRESETS)}")
            top["model"] = dataclasses.replace(MODEL_PRESETS[value])
        else:
            if key not in train_hints or key == "model":
                close = difflib.get_close_matches(key, train_hints, n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise ValueError(f"unknown override {key!r}{hint} (fields: {sorted(train_hints)})")
            top[key] = _coerce("TrainConfig", key, train_hints[key], value)
    base_model = top.pop("model", cfg.model)
    new_model = dataclasses.replace(base_model, **model) if model else dataclasses.replace(base_model)
    return dataclasses.replace(cfg, model=new_model, **top)


def apply_overrides(cfg: TrainConfig, overrides: list[str] | tuple[str, ...]) -> TrainConfig:
    """Apply `key=value` strings (`lr=1e-3`, `model.dim=256`, `init_from=runs/a`); re-validates."""
    items = []
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} is not key=value; e.g. lr=1e-3 or model.n_layers=4")
        k, v = ov.split("=", 1)
        items.append((k.strip(), _parse_value(v)))
    return _apply(cfg, items)
