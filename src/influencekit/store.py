"""The one persistence layer: safetensors files + a JSON manifest, fingerprinted, atomic, checked.

Layout of one artifact (a folder under the store's root)::

    <root>/<name>/manifest.json        format, fingerprint, arguments, complete, file checksums
    <root>/<name>/tensors.safetensors  a single-shot artifact (Artifact.save / load)
    <root>/<name>/chunk-000000.safetensors ...   a chunked one (write_chunk / read_chunk)

**Values.** A file holds a *tree*: nested dicts, lists and tuples (and dataclasses) of tensors,
ints, floats, strings, bools and ``None`` — a model's or an optimizer's ``state_dict``, a dataclass
of results. The tensors go into the safetensors file, the skeleton into its metadata as JSON;
nothing is pickled and loading runs no stored code (:func:`pack_tree`, :func:`unpack_tree`).

**Atomicity.** Every file is written to a temporary name (with the permissions a plain
``open()`` would give, i.e. following the umask), flushed and moved into place with
``os.replace``, and is recorded in the manifest (with its SHA-256) only after that: a run killed at
any point leaves either a finished file or none, and a restart redoes only what the manifest lacks.

**What is verified when.**

- Opening an artifact compares its fingerprint with the current one; a difference raises
  :class:`~influencekit.errors.ArtifactError` naming the component that changed (``model``:
  parameter and buffer values, ``architecture``: the module tree and its code, ``task``: the loss,
  forward and measurement, ``data``, ``settings``, or any other named part).
- Opening an artifact also checks the SHA-256 of every file its manifest records (complete or
  not), so a corrupted or truncated file is refused at once (e.g. in ``fit()``), not when it is
  first read. Reading a file checks its checksum again (the file may change in between).
- A missing or unreadable manifest, an unknown format, files that cannot be read (permission
  denied), a store path that is a regular file and an unfinished artifact in a read-only folder
  each raise an :class:`ArtifactError` that says which it is and what to do.

**Fingerprints** (:func:`fingerprint`) hash everything that defines a computation, without
``id()`` or memory addresses, so they are equal across processes. Code is identified by where it
lives: code from torch, the standard library and installed packages by module, name and package
version; other code (yours) by its source and bytecode, following what it uses: default
arguments, closure cells, the globals it reads, ``functools.partial`` arguments, the attributes
of callable objects. What cannot be hashed stably (e.g. an object whose only description holds a
memory address) raises an :class:`ArtifactError` that names it.

Any estimator can store its state this way::

    store = ArtifactStore("runs/mnist")
    fp = fingerprint(task=task, data=train, settings={"method": "ekfac", ...})
    art = store.open("ekfac-factors", fp, arguments)
    if not art.complete:
        art.save({"A": a, "G": g})
    factors = art.load()
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import errno
import functools
import hashlib
import inspect
import json
import os
import re
import secrets
import shutil
import site
import sys
import sysconfig
import types
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .batching import Data, iter_batches, tree_leaves
from .errors import ArtifactError, InputError

FORMAT = 2
MANIFEST = "manifest.json"
SINGLE = "tensors.safetensors"
_FILE_NAME = re.compile(r"^[A-Za-z0-9_.-]+\.safetensors$")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{4,}")
_NO_STORE = ("make it a plain module-level function (or an object whose attributes are tensors, "
             "numbers and strings), or do not store results (store=None, checkpoint_dir=None)")


# --------------------------------------------------------------------------- hashing
def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


@functools.cache
def _site_dirs() -> tuple[str, ...]:
    dirs = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    dirs.update(site.getsitepackages())
    with contextlib.suppress(AttributeError):
        dirs.add(site.getusersitepackages())
    return tuple(os.path.realpath(d) + os.sep for d in dirs)


@functools.cache
def _library_version(module_name: str | None) -> str | None:
    """The version that identifies code of ``module_name`` when it is library code (torch, the
    standard library, an installed package), else ``None`` (the code is hashed instead)."""
    root = (module_name or "").split(".")[0]
    if root in ("builtins", "__main__", ""):
        return sys.version if root == "builtins" else None
    if root in sys.stdlib_module_names:
        return sys.version
    mod = sys.modules.get(root)
    if root == "torch" or mod is None:
        return getattr(mod, "__version__", "") if root == "torch" else None
    file = getattr(mod, "__file__", None)
    if file and os.path.realpath(file).startswith(_site_dirs()):
        return str(getattr(mod, "__version__", ""))
    return None


def _source(obj: Any) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""  # defined in a REPL or exec: the bytecode still identifies it


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


_CLASS_SKIP = {"__dict__", "__weakref__", "__module__", "__qualname__", "__doc__",
               "__annotations__", "__firstlineno__", "__static_attributes__", "__slots__",
               "__parameters__", "__orig_bases__", "__abstractmethods__", "_abc_impl",
               "__dataclass_fields__", "__dataclass_params__", "__match_args__"}
_PLAIN = (type(None), bool, int, float, complex, str, bytes)
_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
_C_CALLABLES = (types.BuiltinFunctionType, types.MethodWrapperType, types.WrapperDescriptorType,
                types.MethodDescriptorType, types.ClassMethodDescriptorType)


class _Hasher:
    """A canonical, address-free encoding of values, fed into SHA-256 (see :func:`hash_value`).

    Containers, objects and code are remembered by identity while hashing, so shared and cyclic
    references are encoded as back-references (by visit order, which is deterministic).
    """

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self._seen: dict[int, int] = {}
        self._keep: list[Any] = []  # keeps visited objects alive so that ids stay unique
        self._where: list[str] = []

    def hexdigest(self) -> str:
        return self.h.hexdigest()

    def token(self, tag: str, payload: bytes | str = b"") -> None:
        data = payload.encode() if isinstance(payload, str) else payload
        self.h.update(f"{tag}:{len(data)}:".encode() + data)

    def _refuse(self, why: str) -> None:
        where = " → ".join(self._where) or "a value"
        raise ArtifactError(f"cannot fingerprint {where}: {why}. A stored result could not be "
                            f"told apart from one computed with something else; {_NO_STORE}.")

    def _first_visit(self, obj: Any) -> bool:
        if id(obj) in self._seen:
            self.token("ref", str(self._seen[id(obj)]))
            return False
        self._seen[id(obj)] = len(self._seen)
        self._keep.append(obj)
        return True

    @contextlib.contextmanager
    def at(self, where: str) -> Iterator[None]:
        self._where.append(where)
        try:
            yield
        finally:
            self._where.pop()

    # ------------------------------------------------------------------ dispatch
    def value(self, obj: Any) -> None:
        if isinstance(obj, enum.Enum):
            self.token("enum", f"{type(obj).__module__}:{type(obj).__qualname__}.{obj.name}")
        elif isinstance(obj, bool) or obj is None:
            self.token("const", repr(obj))
        elif isinstance(obj, int):
            self.token("int", str(int(obj)))
        elif isinstance(obj, float):
            self.token("float", float(obj).hex())
        elif isinstance(obj, (complex, str, bytes, bytearray, range, slice, PurePath)):
            self.token(type(obj).__name__, obj if isinstance(obj, (bytes, bytearray))
                       else str(obj) if isinstance(obj, (str, PurePath)) else repr(obj))
        elif isinstance(obj, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            self.token("torch", str(obj))
        elif isinstance(obj, torch.Tensor):
            self.tensor(obj)
        elif isinstance(obj, (np.ndarray, np.generic)):
            self.token("numpy", f"{obj.dtype}:{obj.shape}")
            self.token("data", np.ascontiguousarray(obj).tobytes())
        elif isinstance(obj, torch.Generator):
            self.token("generator", str(obj.device))
            self.tensor(obj.get_state())
        elif isinstance(obj, types.ModuleType):
            self.token("pymodule", obj.__name__)
        elif not self._first_visit(obj):
            return
        elif isinstance(obj, (list, tuple)):
            self.sequence(obj)
        elif isinstance(obj, (set, frozenset)):
            self.token("set", str(len(obj)))
            for d in sorted(hash_value(x) for x in obj):
                self.token("item", d)
        elif isinstance(obj, dict):
            self.mapping(obj)
        elif isinstance(obj, nn.Module):
            self.token("nn.Module")
            self.architecture(obj)
            self.state(obj)
        elif isinstance(obj, type):
            self.cls(obj)
        elif isinstance(obj, types.FunctionType):
            self.function(obj)
        elif isinstance(obj, types.CodeType):
            self.code(obj)
        elif isinstance(obj, types.MethodType):
            self.token("method")
            self.value(obj.__func__)
            with self.at("the object it is bound to"):
                self.value(obj.__self__)
        elif isinstance(obj, functools.partial):
            self.token("partial")
            for part, v in (("function", obj.func), ("args", obj.args),
                            ("keywords", obj.keywords)):
                with self.at(f"partial {part}"):
                    self.value(v)
        elif isinstance(obj, (staticmethod, classmethod)):
            self.value(obj.__func__)
        elif isinstance(obj, property):
            self.sequence((obj.fget, obj.fset, obj.fdel))
        elif isinstance(obj, _C_CALLABLES):
            self.builtin(obj)
        else:
            self.instance(obj)

    def tensor(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            self._refuse("a tensor on the meta device has no values")
        self.token("tensor", f"{t.dtype}:{tuple(t.shape)}")
        self.token("data", _tensor_bytes(t))

    def sequence(self, items: Any) -> None:
        if type(items) not in (list, tuple, torch.Size):
            self.value(type(items))  # a namedtuple or another subclass
        self.token("seq", str(len(items)))
        for i, x in enumerate(items):
            with self.at(f"[{i}]"):
                self.value(x)

    def mapping(self, d: Mapping[Any, Any]) -> None:
        if type(d) not in (dict, collections.OrderedDict):
            self.value(type(d))
        keyed = sorted(((hash_value(k), k) for k in d), key=lambda kv: kv[0])
        self.token("dict", str(len(keyed)))
        for digest_, k in keyed:
            self.token("key", digest_)
            with self.at(f"[{k!r}]"):
                self.value(d[k])

    # ------------------------------------------------------------------ code
    def function(self, f: types.FunctionType) -> None:
        self.token("function", f"{f.__module__}:{f.__qualname__}")
        version = _library_version(f.__module__)
        if version is not None:
            self.token("version", version)
            return
        with self.at(f"{f.__qualname__}()"):
            self.token("source", _source(f))
            self.code(f.__code__)
            with self.at("default arguments"):
                self.value(f.__defaults__)
                self.value(f.__kwdefaults__)
            for name, cell in zip(f.__code__.co_freevars, f.__closure__ or (), strict=True):
                self.token("closure", name)
                with self.at(f"closure {name!r}"):
                    try:
                        self.value(cell.cell_contents)
                    except ValueError:  # an empty cell
                        self.token("empty")
            for name in sorted(_global_names(f.__code__) & set(f.__globals__)):
                self.token("global", name)
                with self.at(f"global {name!r}"):
                    self.value(f.__globals__[name])

    def code(self, code: types.CodeType) -> None:
        self.token("code", code.co_code)
        self.token("names", "\x00".join(code.co_names))
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                self.code(c)
            else:
                self.value(c)

    def builtin(self, f: Any) -> None:
        owner = getattr(f, "__objclass__", None) or getattr(f, "__self__", None)
        module = getattr(f, "__module__", None) or getattr(owner, "__module__", None)
        if isinstance(owner, types.ModuleType):
            module = owner.__name__
        self.token("builtin", f"{module}:{getattr(f, '__qualname__', f.__name__)}")
        self.token("version", _library_version(module) or "")
        bound = getattr(f, "__self__", None)
        if bound is not None and not isinstance(bound, (types.ModuleType, type)):
            with self.at("the object it is bound to"):
                self.value(bound)

    def cls(self, c: type) -> None:
        self.token("class", f"{c.__module__}:{c.__qualname__}")
        version = _library_version(c.__module__)
        if version is not None:
            self.token("version", version)
            return
        with self.at(f"class {c.__qualname__}"):
            for base in c.__mro__[1:]:
                if base is not object:
                    self.value(base)
            self.token("source", _source(c))
            for name, attr in sorted(vars(c).items()):
                code_like = (types.FunctionType, staticmethod, classmethod, property)
                if name not in _CLASS_SKIP and (isinstance(attr, code_like)
                                                or isinstance(attr, _PLAIN)):
                    self.token("attr", name)
                    self.value(attr)

    # ------------------------------------------------------------------ objects
    def attributes(self, obj: Any, names: list[str]) -> None:
        for name in sorted(names):
            self.token("attr", name)
            with self.at(f".{name}"):
                self.value(getattr(obj, name))

    def instance(self, obj: Any) -> None:
        names = list(getattr(obj, "__dict__", {}))
        for klass in type(obj).__mro__:
            slots = klass.__dict__.get("__slots__", ())
            names += [s for s in ([slots] if isinstance(slots, str) else slots)
                      if s not in ("__dict__", "__weakref__") and hasattr(obj, s)]
        if not names and not dataclasses.is_dataclass(obj):
            text = repr(obj)
            if _ADDRESS.search(text) or " object at " in text:
                self._refuse(f"a {type(obj).__qualname__} has no attributes to hash and its "
                             f"description {text[:80]!r} holds a memory address")
            self.token("repr", text)
        self.token("object")
        self.value(type(obj))
        self.attributes(obj, names)

    def architecture(self, model: nn.Module) -> None:
        """The module tree: its description, each module's class (code) and public attributes,
        hooks, and which parameters are trained."""
        text = repr(model)
        if _ADDRESS.search(text):
            self._refuse(f"the description of the {type(model).__name__} model holds a memory "
                         "address")
        self.token("repr", text)
        for name, m in model.named_modules():
            self.token("module", name)
            with self.at(f"module {name or type(m).__name__!r}"):
                self.value(type(m))
                self.attributes(m, [k for k in vars(m)
                                    if not k.startswith("_") and k != "training"])
                for hooks in _HOOKS:
                    for hook in getattr(m, hooks, {}).values():
                        self.token("hook", hooks)
                        self.value(hook)
        for name, p in model.named_parameters():
            self.token("trained", f"{name}:{p.requires_grad}")

    def state(self, model: nn.Module) -> None:
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            self.token("name", name)
            self.tensor(t)


def hash_value(*parts: Any) -> str:
    """SHA-256 of any values: tensors by value, containers recursively, code by its source,
    bytecode and what it uses (see the module docstring). Raises :class:`ArtifactError` for
    what cannot be hashed stably."""
    h = _Hasher()
    h.value(parts)
    return h.hexdigest()


def tensor_fingerprint(*tensors: torch.Tensor) -> str:
    """SHA-256 of tensors (dtypes, shapes, values), e.g. of an upstream result."""
    return hash_value(tensors)


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, dtypes, shapes, values)."""
    h = _Hasher()
    h.state(model)
    return h.hexdigest()


def architecture_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the module tree: ``repr``, each module's class (its code unless it comes from
    torch or an installed package), public attributes and hooks, and which parameters train."""
    h = _Hasher()
    with h.at("the model"):
        h.architecture(model)
    return h.hexdigest()


def task_fingerprint(task: Any) -> str:
    """SHA-256 of what a Task computes besides the model: its loss, forward and measurement
    functions, the selected parameter names and ``eval_mode``."""
    h = _Hasher()
    for attr in ("loss_fn", "forward_fn", "measurement_fn", "param_names", "eval_mode"):
        with h.at(f"task.{attr}"):
            h.token("part", attr)
            h.value(getattr(task, attr))
    return h.hexdigest()


def data_fingerprint(data: Data, batch_size: int = 1024) -> str:
    """SHA-256 of every tensor of ``data`` in order (one pass; independent of batching)."""
    leaves: list[Any] = []
    meta: list[str] = []
    n = 0
    for batch in iter_batches(data, batch_size):
        for i, leaf in enumerate(tree_leaves(batch)):
            if i == len(leaves):
                leaves.append(hashlib.sha256())
                meta.append(f"{leaf.dtype}:{tuple(leaf.shape[1:])}")
            leaves[i].update(_tensor_bytes(leaf))
        n += tree_leaves(batch)[0].shape[0]
    return hash_value(n, meta, [leaf.hexdigest() for leaf in leaves])


def settings_fingerprint(settings: Mapping[str, Any]) -> str:
    """SHA-256 of the settings (key order does not matter)."""
    return hash_value(dict(settings))


def fingerprint(*, task: Any = None, model: nn.Module | None = None, data: Data | None = None,
                settings: Mapping[str, Any] | None = None, **parts: Any) -> dict[str, str]:
    """A fingerprint with one hash per component, so that a mismatch names what changed.

    Args:
        task: an influencekit ``Task``: adds ``model`` (its parameters and buffers),
            ``architecture`` (module tree and code) and ``task`` (loss, forward, measurement,
            parameter selection, eval mode).
        model: a module without a task: ``model`` and ``architecture``.
        data: ``data`` (every tensor, in order). settings: ``settings`` (a dict of options).
        parts: more components: a string is taken as a precomputed hash (e.g.
            ``eigenbasis=<hash of an upstream artifact>`` chains artifacts); anything else is
            hashed with :func:`hash_value`.
    """
    if task is not None and model is not None:
        raise InputError("fingerprint takes task= or model=, not both (a task holds its model).")
    fp: dict[str, str] = {}
    model = task.model if task is not None else model
    if model is not None:
        fp["model"] = model_fingerprint(model)
        fp["architecture"] = architecture_fingerprint(model)
    if task is not None:
        fp["task"] = task_fingerprint(task)
    if data is not None:
        fp["data"] = data_fingerprint(data)
    if settings is not None:
        fp["settings"] = settings_fingerprint(settings)
    for name, part in parts.items():
        fp[name] = part if isinstance(part, str) else hash_value(part)
    return fp


def digest(fp: Mapping[str, str]) -> str:
    """One hash for a whole fingerprint."""
    return hash_value(dict(fp))


_WHAT_CHANGED = {
    "model": "parameter or buffer values", "architecture": "the model's modules or their code",
    "task": "the loss, forward or measurement", "data": "the data", "settings": "the settings",
}


# --------------------------------------------------------------------------- trees
def _skeleton(obj: Any, tensors: dict[str, torch.Tensor], ptrs: set[int], where: str) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int) and type(obj) is int:
        return obj
    if type(obj) is float:
        return {"float": obj.hex()}
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.layout != torch.strided:
            raise ArtifactError(f"cannot store {where}: a {t.layout} tensor; convert it with "
                                ".to_dense().")
        ptr = t.untyped_storage().data_ptr()
        t = t.clone() if ptr and ptr in ptrs else t.contiguous()  # safetensors refuses sharing
        ptrs.add(ptr)
        key = str(len(tensors))
        tensors[key] = t
        return {"tensor": key}
    if type(obj) in (list, tuple):
        return {type(obj).__name__: [_skeleton(x, tensors, ptrs, f"{where}[{i}]")
                                     for i, x in enumerate(obj)]}
    if type(obj) in (dict, collections.OrderedDict):
        for k in obj:
            if not (k is None or isinstance(k, (bool, int, float, str, tuple))):
                raise ArtifactError(f"cannot store {where}: a dict key of type "
                                    f"{type(k).__name__}; use strings or numbers as keys.")
        return {"dict": [[_skeleton(k, tensors, ptrs, where),
                          _skeleton(v, tensors, ptrs, f"{where}[{k!r}]")]
                         for k, v in obj.items()]}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        return {"dataclass": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: _skeleton(getattr(obj, f.name), tensors, ptrs,
                                             f"{where}.{f.name}")
                           for f in dataclasses.fields(obj)}}
    raise ArtifactError(
        f"cannot store {where}: a {type(obj).__qualname__}. The store holds tensors, ints, "
        "floats, strings, bools, None, and lists, tuples, dicts and dataclasses of them.")


def _dataclass(name: str) -> type:
    module, _, qualname = name.partition(":")
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        raise ArtifactError(f"the stored value is a {name} dataclass, which is not loaded (import "
                            f"{module} first) or is no longer a dataclass.")
    return obj


def _rebuild(node: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if not isinstance(node, dict):
        return node
    (tag, value), *_ = node.items()
    if tag == "tensor":
        return tensors[value]
    if tag == "float":
        return float.fromhex(value)
    if tag in ("list", "tuple"):
        items = [_rebuild(x, tensors) for x in value]
        return items if tag == "list" else tuple(items)
    if tag == "dict":
        return {_rebuild(k, tensors): _rebuild(v, tensors) for k, v in value}
    if tag == "dataclass":
        cls = _dataclass(value)
        obj = cls.__new__(cls)  # the stored state as it was: no __init__ / __post_init__
        for name, field_value in node["fields"].items():
            object.__setattr__(obj, name, _rebuild(field_value, tensors))
        return obj
    raise ArtifactError(f"unknown node {tag!r} in a stored tree (written by a newer version?).")


def pack_tree(tree: Any, metadata: Mapping[str, str] | None = None) -> bytes:
    """``tree`` as safetensors bytes: its tensors, and its skeleton as JSON in the metadata."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _skeleton(tree, tensors, set(), "the value")
    meta = {**(metadata or {}), "tree": json.dumps(skeleton, separators=(",", ":"))}
    try:
        return st_save(tensors, metadata=meta)
    except Exception as e:  # safetensors raises its own error types (e.g. for a dtype)
        raise ArtifactError(f"cannot store the value as safetensors ({e}).") from e


def unpack_tree(blob: bytes) -> Any:
    """The tree packed by :func:`pack_tree` (no code is run)."""
    tensors = st_load(blob)
    size = int.from_bytes(blob[:8], "little")
    meta = json.loads(blob[8:8 + size]).get("__metadata__") or {}
    if "tree" not in meta:
        return tensors
    return _rebuild(json.loads(meta["tree"]), tensors)


# --------------------------------------------------------------------------- atomic writes
def atomic_write(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see either the old file or the new one.

    The file gets the permissions a plain ``open()`` would give (``0o666`` less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                         0o666)
            break
        except FileExistsError:  # pragma: no cover - a 48-bit name collision
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError, AttributeError):  # make the rename durable (POSIX)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def atomic_write_text(text: str, path: str | os.PathLike[str]) -> Path:
    """Write text (UTF-8) atomically; see :func:`atomic_write`."""
    return atomic_write(path, text.encode("utf-8"))


def _os_problem(e: OSError, path: Path, doing: str) -> ArtifactError:
    """An :class:`ArtifactError` for an OS error, saying what kind of problem it is."""
    if isinstance(e, PermissionError) or e.errno == errno.EROFS:
        fix = (f"{path} (or a folder above it) is read-only or belongs to someone else "
               "(permission denied). Nothing is damaged: make it writable (chmod u+w) or use "
               "another store folder.")
    elif isinstance(e, (NotADirectoryError, FileExistsError)) or e.errno == errno.ENOTDIR:
        fix = (f"a part of {path} is a regular file, not a folder. Give a folder path (it is "
               "created when missing).")
    elif e.errno == errno.ENOSPC:
        fix = "the disk is full. Free some space and rerun: finished files are kept."
    else:
        fix = f"{type(e).__name__}: {e}."
    return ArtifactError(f"cannot {doing}: {fix}")


# --------------------------------------------------------------------------- store
class StaleArtifactError(ArtifactError):
    """An artifact's fingerprint differs from the current one; ``changed`` names the parts."""

    def __init__(self, message: str, changed: list[str]):
        super().__init__(message)
        self.changed = changed


class ArtifactStore:
    """A folder of named artifacts (created when missing)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ArtifactError(f"the store path {self.root} is a regular file, not a folder. "
                                "Give a folder path (it is created when missing).")

    def open(self, name: str, fp: Mapping[str, str], arguments: Mapping[str, Any] | None = None,
             *, overwrite: bool = False) -> Artifact:
        """The artifact ``name`` for fingerprint ``fp``.

        A new folder starts an empty artifact. An existing one with the same fingerprint is
        reopened (complete, or partly written and resumable) after its files' checksums are
        verified. One with another fingerprint raises :class:`ArtifactError`, unless
        ``overwrite=True``, which deletes it first (also when its manifest is missing or damaged).
        """
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ArtifactError(f"invalid artifact name {name!r}: use a plain folder name.")
        return Artifact(self.root / name, dict(fp), dict(arguments or {}), overwrite=overwrite)

    def names(self, prefix: str = "") -> list[str]:
        """The artifacts in the store (folders with a manifest) whose names start with
        ``prefix``, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.name.startswith(prefix) and (p / MANIFEST).is_file())

    def __repr__(self) -> str:
        return f"ArtifactStore({str(self.root)!r})"


class Artifact:
    """One artifact: a manifest and its safetensors files (see the module docstring)."""

    def __init__(self, path: Path, fp: dict[str, str], arguments: dict[str, Any], *,
                 overwrite: bool = False):
        self.path = path
        self.fingerprint = fp
        self.arguments = arguments
        if path.exists() and not path.is_dir():
            raise ArtifactError(f"{path} is a regular file, not an artifact folder. Remove it or "
                                "use another name or store folder.")
        if overwrite:
            self._clear()
        manifest = self._read_manifest()
        if manifest is None:
            self.manifest: dict[str, Any] = {
                "format": FORMAT, "fingerprint": fp, "arguments": _jsonable(arguments),
                "complete": False, "files": {}, "info": {},
            }
            self._write_manifest()
            return
        self._check_fresh(manifest)
        self.manifest = manifest
        self._verify()
        if not self.complete and not os.access(path, os.W_OK):
            raise ArtifactError(
                f"the artifact at {path} is incomplete (an interrupted run) and its folder is "
                "read-only, so it cannot be finished here. Nothing is damaged: finish it where "
                "the folder is writable (or make it writable: chmod u+w), or use another store "
                "folder.")

    # ----------------------------------------------------------------- manifest
    def _clear(self) -> None:
        """Delete the artifact's folder, which must hold nothing but artifact files."""
        if not self.path.exists():
            return
        foreign = [p.name for p in self.path.iterdir()
                   if not (p.is_file() and (p.name == MANIFEST or p.suffix == ".safetensors"
                                            or p.name.endswith(".tmp")))]
        if foreign:
            raise ArtifactError(
                f"refusing to delete {self.path} (overwrite=True): it holds files that "
                f"influencekit did not write ({', '.join(sorted(foreign)[:5])}). Delete it "
                "yourself or use another store folder.")
        try:
            shutil.rmtree(self.path)
        except OSError as e:
            raise _os_problem(e, self.path, f"delete {self.path} to recompute it") from e

    def _read_manifest(self) -> dict[str, Any] | None:
        f = self.path / MANIFEST
        redo = f"Delete {self.path} (or pass overwrite=True) to recompute it."
        if not f.exists():
            if self.path.is_dir() and any(self.path.glob("*.safetensors")):
                raise ArtifactError(
                    f"{self.path} holds tensor files but no {MANIFEST}: it was not written by "
                    f"influencekit or is damaged. {redo}")
            return None
        try:
            text = f.read_text()
        except OSError as e:
            raise self._unreadable(f, e) from e
        try:
            manifest = json.loads(text)
        except ValueError as e:
            raise ArtifactError(
                f"{f} is not valid JSON ({e}); the artifact is corrupted. {redo}") from e
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else "?"
            raise ArtifactError(
                f"{f} has format {found}, this version reads format {FORMAT}. {redo}")
        files = manifest.get("files")
        if (not isinstance(manifest.get("fingerprint"), dict) or not isinstance(files, dict)
                or not isinstance(manifest.get("info"), dict)
                or not all(isinstance(k, str) and _FILE_NAME.match(k) for k in files)):
            raise ArtifactError(f"{f} is not a valid manifest; the artifact is corrupted. {redo}")
        return manifest

    def _check_fresh(self, manifest: dict[str, Any]) -> None:
        stored = manifest["fingerprint"]
        if stored != self.fingerprint:
            changed = sorted(k for k in set(stored) | set(self.fingerprint)
                             if stored.get(k) != self.fingerprint.get(k))
            what = "; ".join(f"{k}: {_WHAT_CHANGED[k]}" for k in changed if k in _WHAT_CHANGED)
            raise StaleArtifactError(
                f"the artifact at {self.path} is stale: its {' and '.join(changed)} fingerprint "
                f"differs from the current one{f' ({what})' if what else ''}, so it was computed "
                f"for something else. Use another store folder, delete {self.path}, or pass "
                "overwrite=True to recompute it.", changed)

    def _verify(self) -> None:
        """Check the SHA-256 of every recorded file (streamed; the files are not kept)."""
        for filename, expected in self.manifest["files"].items():
            f = self.path / filename
            try:
                with open(f, "rb") as stream:
                    actual = hashlib.file_digest(stream, "sha256").hexdigest()
            except OSError as e:
                raise self._unreadable(f, e) from e
            if actual != expected:
                raise self._corrupted(filename)

    def _unreadable(self, f: Path, e: OSError) -> ArtifactError:
        if isinstance(e, PermissionError):
            return ArtifactError(
                f"{f} cannot be read (permission denied). The artifact is not damaged: ask its "
                "owner to make it readable (chmod -R a+rX), or use another store folder.")
        return ArtifactError(f"{f} is missing or unreadable ({e}). Delete {self.path} (or pass "
                             "overwrite=True) to recompute it.")

    def _corrupted(self, filename: str) -> ArtifactError:
        return ArtifactError(
            f"{self.path / filename} is corrupted (its checksum differs from the manifest). "
            f"Delete {self.path} (or pass overwrite=True) to recompute it.")

    def _write_manifest(self) -> None:
        try:
            atomic_write(self.path / MANIFEST,
                         json.dumps(self.manifest, indent=1, sort_keys=True).encode())
        except OSError as e:
            raise _os_problem(e, self.path, f"write the artifact at {self.path}") from e

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def info(self) -> dict[str, Any]:
        """Free-form JSON metadata stored with the artifact (e.g. how it was computed)."""
        return self.manifest["info"]

    def finish(self, **info: Any) -> None:
        """Mark the artifact complete (after its last file), recording ``info``."""
        self.manifest["info"].update(_jsonable(info))
        self.manifest["complete"] = True
        self._write_manifest()

    # ----------------------------------------------------------------- files
    def _write(self, filename: str, tree: Any) -> None:
        blob = pack_tree(tree, {"fingerprint": digest(self.fingerprint)})
        try:
            atomic_write(self.path / filename, blob)
        except OSError as e:
            raise _os_problem(e, self.path, f"write {self.path / filename}") from e
        self.manifest["files"][filename] = hashlib.sha256(blob).hexdigest()
        self._write_manifest()

    def _read(self, filename: str) -> Any:
        expected = self.manifest["files"].get(filename)
        if expected is None:
            raise ArtifactError(
                f"{self.path / filename} is not part of the artifact (never finished). Recompute "
                "it: rerun the step that writes it.")
        try:
            blob = (self.path / filename).read_bytes()
        except OSError as e:
            raise self._unreadable(self.path / filename, e) from e
        if hashlib.sha256(blob).hexdigest() != expected:
            raise self._corrupted(filename)
        try:
            return unpack_tree(blob)
        except ArtifactError:
            raise
        except Exception as e:  # safetensors raises its own error types
            raise ArtifactError(f"{self.path / filename} cannot be parsed ({e}).") from e

    def save(self, tree: Any, **info: Any) -> None:
        """Write a single-shot artifact (any tree, see :func:`pack_tree`) and mark it complete."""
        self._write(SINGLE, tree)
        self.finish(**info)

    def load(self) -> Any:
        """Read a complete single-shot artifact (checksum verified)."""
        self._require_complete()
        return self._read(SINGLE)

    # ----------------------------------------------------------------- chunks
    @staticmethod
    def chunk_name(i: int) -> str:
        return f"chunk-{i:06d}.safetensors"

    def has_chunk(self, i: int) -> bool:
        return self.chunk_name(i) in self.manifest["files"]

    def write_chunk(self, i: int, tensors: Any) -> None:
        """Write chunk ``i`` (a tree) atomically; it counts as done once this returns."""
        self._write(self.chunk_name(i), tensors)

    def read_chunk(self, i: int) -> Any:
        return self._read(self.chunk_name(i))

    def done_chunks(self) -> list[int]:
        return sorted(int(f[6:12]) for f in self.manifest["files"] if f.startswith("chunk-"))

    def iter_chunks(self) -> Iterator[Any]:
        """The chunks of a complete chunked artifact, in order."""
        self._require_complete()
        n = int(self.info.get("chunks", len(self.done_chunks())))
        for i in range(n):
            yield self.read_chunk(i)

    def _require_complete(self) -> None:
        if not self.complete:
            raise ArtifactError(
                f"the artifact at {self.path} is incomplete (an interrupted run). Rerun the "
                "step that writes it to resume.")

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"{len(self.manifest['files'])} files"
        return f"Artifact({str(self.path)!r}, {state})"


def _jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values (tuples become lists; other objects their ``str``)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))

