"""A restricted unpickler for PyTorch files that executes nothing.

OpenAI's dVAE files are whole pickled modules (`torch.save(model)`): loading them with `torch.load`
would import `dall_e` and run whatever globals the pickle names. This reader instead resolves every
global the pickle names against a fixed table: tensor storages and `_rebuild_tensor_v2` /
`_rebuild_parameter` become plain tensors, the known module classes become inert `PickledObject`
records (class name + their `__dict__`), `OrderedDict`/`set` are rebuilt as data, and any other
global is refused with `UnsafePickleError` before anything is called. `module_state_dict` then
flattens a record tree into a state dict.

Both container formats are read: the zip format (torch ≥ 1.6) and the legacy stream format.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import struct
import zipfile
from collections.abc import Callable
from typing import Any, BinaryIO

import torch


class UnsafePickleError(ValueError):
    """The pickle names a global outside the allow-list; nothing was executed."""


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

# Module classes of OpenAI's dVAE pickles (and the torch.nn containers/layers they hold).
DALLE_CLASSES = frozenset({
    "dall_e.encoder.Encoder", "dall_e.encoder.EncoderBlock", "dall_e.decoder.Decoder",
    "dall_e.decoder.DecoderBlock", "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential", "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d", "torch.nn.modules.linear.Identity",
    "torch.nn.modules.upsampling.Upsample",
})

# Globals a Lightning checkpoint carries outside its state_dict (callback keys, hyper-parameters,
# optimizer/scheduler state). They become inert records; only `state_dict` is used.
CKPT_OPAQUE_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.",
                        "torch.optim.", "argparse.Namespace", "pathlib.", "typing.", "numpy.")


class PickledObject:
    """Inert stand-in for an instance of a pickled class: `cls` (dotted name), `args`, `state`.

    `find_class` hands out a fresh subclass per allowed name (pickle's NEWOBJ needs a real type);
    creating one runs no code beyond storing what the pickle passes."""

    cls = "?"
    args: tuple = ()
    state: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"PickledObject({self.cls})"


_RECORD_TYPES: dict[str, type] = {}


def _record_type(full: str) -> type:
    if full not in _RECORD_TYPES:
        _RECORD_TYPES[full] = type(full.rsplit(".", 1)[-1], (PickledObject,), {"cls": full, "__module__": "pickled"})
    return _RECORD_TYPES[full]


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _reconstructor(cls: Any, base: Any, state: Any) -> PickledObject:
    # copyreg._reconstructor(cls, object, None): how protocol-2 pickles make module instances.
    if not (isinstance(cls, type) and issubclass(cls, PickledObject)):
        raise UnsafePickleError(f"copyreg._reconstructor called on {cls!r}, which is not an allowed class")
    return cls.__new__(cls)


def _rebuild_tensor_v2(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *rest: Any) -> torch.Tensor:
    if not isinstance(storage, torch.Tensor):
        raise UnsafePickleError("tensor rebuilt from something that is not a storage")
    numel = 1
    for s in size:
        numel *= s
    if numel == 0:
        return torch.empty(size, dtype=storage.dtype)
    # A view: legacy files fill storages only after the pickle, in place. Callers clone.
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _rebuild_parameter(data: torch.Tensor, *rest: Any) -> torch.Tensor:
    return data


def _ordered_dict(*args: Any) -> collections.OrderedDict:
    return collections.OrderedDict(*args)


def _device(*args: Any) -> str:
    return ":".join(str(a) for a in args)


class RestrictedUnpickler(pickle.Unpickler):
    """`allowed_classes`: dotted class names rebuilt as PickledObject records. `opaque_prefixes`:
    dotted-name prefixes of globals turned into inert records (checkpoint metadata). Anything else
    raises UnsafePickleError."""

    def __init__(self, file: BinaryIO, load_storage: Callable[[tuple], torch.Tensor] | None,
                 allowed_classes: frozenset[str] = frozenset(), opaque_prefixes: tuple[str, ...] = ()) -> None:
        super().__init__(file)
        self._load_storage = load_storage
        self._allowed = allowed_classes
        self._opaque = opaque_prefixes

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles (torch.save's default) spell some globals with Python 2 names
        # (subprocess → commands, builtins → __builtin__); judge them by their Python 3 names.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name == "device":
            return _device
        if full == "collections.OrderedDict":
            return _ordered_dict
        if full == "builtins.set":
            return set
        if full == "copyreg._reconstructor":
            return _reconstructor
        if full == "builtins.object":
            return object
        if full in self._allowed:
            return _record_type(full)
        if self._opaque and full.startswith(self._opaque):
            return _record_type(full)
        raise UnsafePickleError(
            f"the pickle names the global {full!r}, which a tokenizer file has no reason to contain; refusing "
            "to load it (nothing was executed). Only OpenAI dVAE module pickles and Lightning checkpoints are read"
        )

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":
            # Legacy files carry each module class's source text for a diff warning; never used.
            return pid[1]
        if self._load_storage is None or not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise UnsafePickleError(f"unexpected persistent id {str(pid)[:80]}")
        return self._load_storage(pid)


def _dtype_of(storage_type: Any) -> torch.dtype:
    if not isinstance(storage_type, _StorageType):
        raise UnsafePickleError(f"storage of unknown type {storage_type!r}")
    return storage_type.dtype


def load_restricted(path: str, *, allowed_classes: frozenset[str] = frozenset(),
                    opaque_prefixes: tuple[str, ...] = ()) -> Any:
    """Unpickle a torch.save file (zip or legacy) with the restrictions above; returns the object tree."""
    with open(path, "rb") as f:
        data = f.read()
    if zipfile.is_zipfile(io.BytesIO(data)):
        return _load_zip(data, allowed_classes, opaque_prefixes)
    return _load_legacy(data, allowed_classes, opaque_prefixes)


def _load_zip(data: bytes, allowed: frozenset[str], opaque: tuple[str, ...]) -> Any:
    zf = zipfile.ZipFile(io.BytesIO(data))
    pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
        raise ValueError("not a PyTorch zip checkpoint (no single data.pkl inside)")
    prefix = pkl[0][: -len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in zf.namelist():
        byteorder = zf.read(prefix + "byteorder").decode().strip()
    if byteorder != "little":
        raise ValueError(f"big-endian checkpoints are not supported (byteorder {byteorder!r})")
    cache: dict[str, torch.Tensor] = {}

    def load_storage(pid: tuple) -> torch.Tensor:
        _, stype, key, _location, _numel = pid[:5]
        dtype = _dtype_of(stype)
        key = str(key)
        if key not in cache:
            raw = bytearray(zf.read(f"{prefix}data/{key}"))
            cache[key] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return cache[key]

    return RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), load_storage, allowed, opaque).load()


def _load_legacy(data: bytes, allowed: frozenset[str], opaque: tuple[str, ...]) -> Any:
    f = io.BytesIO(data)
    magic = RestrictedUnpickler(f, None).load()
    if magic != 0x1950A86A20F9469CFC6C:
        raise ValueError("not a PyTorch checkpoint (bad magic number)")
    RestrictedUnpickler(f, None).load()  # protocol version
    RestrictedUnpickler(f, None).load()  # sys info
    pending: dict[str, tuple[torch.dtype, torch.Tensor]] = {}

    def load_storage(pid: tuple) -> torch.Tensor:
        _, stype, key, _location, numel = pid[:5]
        if len(pid) > 5 and pid[5] is not None:
            raise ValueError("legacy storage views are not supported")
        dtype = _dtype_of(stype)
        if key not in pending:
            # Placeholder filled in place once the raw bytes (which follow the pickle) are read.
            pending[key] = (dtype, torch.empty(int(numel), dtype=dtype))
        return pending[key][1]

    obj = RestrictedUnpickler(f, load_storage, allowed, opaque).load()
    keys = RestrictedUnpickler(f, None).load()
    for key in keys:
        dtype, buf = pending[key]
        (n,) = struct.unpack("<q", f.read(8))
        nbytes = n * buf.element_size()
        raw = bytearray(f.read(nbytes))
        if n != buf.numel() or len(raw) != nbytes:
            raise ValueError(f"legacy checkpoint is truncated (storage {key})")
        if n:
            buf.copy_(torch.frombuffer(raw, dtype=dtype))
    return obj


def module_state_dict(obj: PickledObject, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flatten a pickled nn.Module record tree into a state dict (parameters + persistent buffers)."""
    if not isinstance(obj, PickledObject) or not isinstance(obj.state, dict):
        raise ValueError(f"expected a pickled module at {prefix or '<root>'}, got {obj!r}")
    st = obj.state
    out: dict[str, torch.Tensor] = {}
    non_persistent = st.get("_non_persistent_buffers_set") or set()
    for name, t in (st.get("_parameters") or {}).items():
        if t is not None:
            out[prefix + name] = t.detach().clone()
    for name, t in (st.get("_buffers") or {}).items():
        if t is not None and name not in non_persistent:
            out[prefix + name] = t.detach().clone()
    for name, child in (st.get("_modules") or {}).items():
        if child is not None:
            out.update(module_state_dict(child, f"{prefix}{name}."))
    return out
