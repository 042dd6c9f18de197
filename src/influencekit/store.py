"""On-disk artifacts: safetensors files + a JSON manifest, chunked, atomic, resumable, checked.

Layout of one artifact (a folder under the store's root)::

    <root>/<name>/manifest.json        format, fingerprint, arguments, complete, file checksums
    <root>/<name>/tensors.safetensors  a single-shot artifact (Artifact.save / load)
    <root>/<name>/chunk-000000.safetensors ...   a chunked one (write_chunk / read_chunk)

Every file is written to a temporary name, flushed and moved into place with ``os.replace``, and
is recorded in the manifest (with its SHA-256) only after that: a run killed at any point leaves
either a finished file or none, and a restart redoes only the chunks the manifest lacks. The
fingerprint names the model (parameters and buffers), the data and the settings; opening an
artifact whose fingerprint differs, or reading a file whose checksum differs, raises
:class:`~influencekit.errors.ArtifactError` — a stale or corrupted artifact is never reused.

Any estimator can store its state this way::

    store = ArtifactStore("runs/mnist")
    fp = fingerprint(model=task.model, data=train, settings={"method": "ekfac", ...})
    art = store.open("ekfac-factors", fp, arguments)
    if not art.complete:
        art.save({"A": a, "G": g})
    factors = art.load()
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .batching import Data, iter_batches, tree_leaves
from .errors import ArtifactError

FORMAT = 1
MANIFEST = "manifest.json"
SINGLE = "tensors.safetensors"


# --------------------------------------------------------------------------- fingerprints
def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def tensor_fingerprint(*tensors: torch.Tensor) -> str:
    """SHA-256 of tensors (dtypes, shapes, values), e.g. of an upstream result."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, dtypes, shapes, values)."""
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
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
    h = hashlib.sha256(f"{n}|{'|'.join(meta)}".encode())
    for leaf in leaves:
        h.update(leaf.digest())
    return h.hexdigest()


def settings_fingerprint(settings: Mapping[str, Any]) -> str:
    """SHA-256 of the settings as canonical JSON."""
    return hashlib.sha256(_canonical(settings).encode()).hexdigest()


def fingerprint(*, model: nn.Module | None = None, data: Data | None = None,
                settings: Mapping[str, Any] | None = None,
                **parts: str) -> dict[str, str]:
    """A fingerprint with one hash per component (so a mismatch can name what changed).

    ``parts`` adds precomputed hashes, e.g. ``eigenbasis=<fingerprint hash of an upstream
    artifact>`` to chain artifacts.
    """
    fp: dict[str, str] = {}
    if model is not None:
        fp["model"] = model_fingerprint(model)
    if data is not None:
        fp["data"] = data_fingerprint(data)
    if settings is not None:
        fp["settings"] = settings_fingerprint(settings)
    fp.update(parts)
    return fp


def digest(fp: Mapping[str, str]) -> str:
    """One hash for a whole fingerprint."""
    return settings_fingerprint(dict(fp))


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


# --------------------------------------------------------------------------- atomic writes
def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


# --------------------------------------------------------------------------- store
class ArtifactStore:
    """A folder of named artifacts."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def open(self, name: str, fp: Mapping[str, str], arguments: Mapping[str, Any] | None = None,
             *, overwrite: bool = False) -> Artifact:
        """The artifact ``name`` for fingerprint ``fp``.

        A new folder starts an empty artifact. An existing one with the same fingerprint is
        reopened (complete, or partly written and resumable). One with another fingerprint raises
        :class:`ArtifactError`, unless ``overwrite=True``, which deletes it first.
        """
        if not name or "/" in name or name.startswith("."):
            raise ArtifactError(f"invalid artifact name {name!r}: use a plain folder name.")
        return Artifact(self.root / name, dict(fp), dict(arguments or {}), overwrite=overwrite)

    def __repr__(self) -> str:
        return f"ArtifactStore({str(self.root)!r})"


class Artifact:
    """One artifact: a manifest and its safetensors files (see the module docstring)."""

    def __init__(self, path: Path, fp: dict[str, str], arguments: dict[str, Any], *,
                 overwrite: bool = False):
        self.path = path
        self.fingerprint = fp
        self.arguments = arguments
        manifest = self._read_manifest()
        if manifest is not None and overwrite:
            shutil.rmtree(path)
            manifest = None
        if manifest is None:
            self.manifest: dict[str, Any] = {
                "format": FORMAT, "fingerprint": fp, "arguments": json.loads(_canonical(arguments)),
                "complete": False, "files": {}, "info": {},
            }
            self._write_manifest()
        else:
            self._check_fresh(manifest)
            self.manifest = manifest

    # ----------------------------------------------------------------- manifest
    def _read_manifest(self) -> dict[str, Any] | None:
        f = self.path / MANIFEST
        if not f.exists():
            if self.path.exists() and any(self.path.glob("*.safetensors")):
                raise ArtifactError(
                    f"{self.path} holds tensor files but no {MANIFEST}: it was not written by "
                    "influencekit or is damaged. Delete the folder (or pass overwrite=True).")
            return None
        try:
            manifest = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise ArtifactError(
                f"{f} is unreadable or not valid JSON ({e}); the artifact is corrupted. Delete "
                f"{self.path} (or pass overwrite=True) to recompute it.") from e
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ArtifactError(
                f"{f} has format {manifest.get('format') if isinstance(manifest, dict) else '?'}"
                f", this version reads format {FORMAT}. Delete {self.path} (or pass "
                "overwrite=True) to recompute it.")
        return manifest

    def _check_fresh(self, manifest: dict[str, Any]) -> None:
        stored = manifest.get("fingerprint", {})
        if stored != self.fingerprint:
            changed = sorted(k for k in set(stored) | set(self.fingerprint)
                             if stored.get(k) != self.fingerprint.get(k))
            raise ArtifactError(
                f"the artifact at {self.path} is stale: its {' and '.join(changed)} "
                "fingerprint differs from the current one (computed for another model, data or "
                f"settings). Use another store folder, delete {self.path}, or pass "
                "overwrite=True to recompute it.")

    def _write_manifest(self) -> None:
        atomic_write(self.path / MANIFEST,
                     json.dumps(self.manifest, indent=1, sort_keys=True).encode())

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def info(self) -> dict[str, Any]:
        """Free-form JSON metadata stored with the artifact (e.g. how it was computed)."""
        return self.manifest["info"]

    def finish(self, **info: Any) -> None:
        """Mark the artifact complete (after its last file), recording ``info``."""
        self.manifest["info"].update(json.loads(_canonical(info)))
        self.manifest["complete"] = True
        self._write_manifest()

    # ----------------------------------------------------------------- files
    def _write(self, filename: str, tensors: Mapping[str, torch.Tensor]) -> None:
        blob = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                       metadata={"fingerprint": digest(self.fingerprint)})
        atomic_write(self.path / filename, blob)
        self.manifest["files"][filename] = hashlib.sha256(blob).hexdigest()
        self._write_manifest()

    def _read(self, filename: str) -> dict[str, torch.Tensor]:
        expected = self.manifest["files"].get(filename)
        if expected is None:
            raise ArtifactError(
                f"{self.path / filename} is not part of the artifact (never finished). Recompute "
                "it: rerun the step that writes it.")
        try:
            blob = (self.path / filename).read_bytes()
        except OSError as e:
            raise ArtifactError(
                f"{self.path / filename} is missing or unreadable ({e}). Delete {self.path} "
                "(or pass overwrite=True) to recompute it.") from e
        if hashlib.sha256(blob).hexdigest() != expected:
            raise ArtifactError(
                f"{self.path / filename} is corrupted (its checksum differs from the manifest). "
                f"Delete {self.path} (or pass overwrite=True) to recompute it.")
        try:
            return st_load(blob)
        except Exception as e:  # safetensors raises its own error types
            raise ArtifactError(f"{self.path / filename} cannot be parsed ({e}).") from e

    def save(self, tensors: Mapping[str, torch.Tensor], **info: Any) -> None:
        """Write a single-shot artifact and mark it complete."""
        self._write(SINGLE, tensors)
        self.finish(**info)

    def load(self) -> dict[str, torch.Tensor]:
        """Read a complete single-shot artifact (checksum verified)."""
        self._require_complete()
        return self._read(SINGLE)

    # ----------------------------------------------------------------- chunks
    @staticmethod
    def chunk_name(i: int) -> str:
        return f"chunk-{i:06d}.safetensors"

    def has_chunk(self, i: int) -> bool:
        return self.chunk_name(i) in self.manifest["files"]

    def write_chunk(self, i: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write chunk ``i`` atomically; it counts as done once this returns."""
        self._write(self.chunk_name(i), tensors)

    def read_chunk(self, i: int) -> dict[str, torch.Tensor]:
        return self._read(self.chunk_name(i))

    def done_chunks(self) -> list[int]:
        return sorted(int(f[6:12]) for f in self.manifest["files"] if f.startswith("chunk-"))

    def iter_chunks(self) -> Iterator[dict[str, torch.Tensor]]:
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
