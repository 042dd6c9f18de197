"""The artifact store: round trips, fingerprints, staleness, corruption, atomicity, resume,
and the reliability cases of issue 9."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import stat
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import influencekit as ik
from influencekit.errors import ArtifactError
from influencekit.store import (
    ArtifactStore,
    StaleArtifactError,
    atomic_write,
    data_fingerprint,
    fingerprint,
    hash_value,
    model_fingerprint,
    pack_tree,
    settings_fingerprint,
    unpack_tree,
)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


@pytest.fixture
def fp(model):
    data = (torch.arange(20.0).reshape(5, 4), torch.arange(5))
    return fingerprint(model=model, data=data, settings={"rank": 3, "seed": 0})


def test_single_round_trip(tmp_path, fp):
    store = ArtifactStore(tmp_path)
    art = store.open("eig", fp, {"rank": 3})
    assert not art.complete
    t = {"values": torch.tensor([3.0, 2.0], dtype=torch.float64), "vectors": torch.randn(2, 7)}
    art.save(t, note="hello")
    again = store.open("eig", fp)
    assert again.complete and again.info["note"] == "hello"
    loaded = again.load()
    assert set(loaded) == {"values", "vectors"}
    assert all(torch.equal(loaded[k], t[k]) and loaded[k].dtype == t[k].dtype for k in t)
    manifest = json.loads((tmp_path / "eig" / "manifest.json").read_text())
    assert manifest["fingerprint"] == fp and manifest["arguments"] == {"rank": 3}


def test_fingerprint_components(model):
    data = (torch.arange(20.0).reshape(5, 4), torch.arange(5))
    base = model_fingerprint(model)
    with torch.no_grad():
        model[1].running_mean += 1  # buffers count
    assert model_fingerprint(model) != base
    d2 = (data[0].clone(), data[1].clone())
    assert data_fingerprint(data) == data_fingerprint(d2)
    d2[0][3, 1] += 1e-6
    assert data_fingerprint(data) != data_fingerprint(d2)
    assert data_fingerprint(data, batch_size=2) == data_fingerprint(data, batch_size=3)
    assert settings_fingerprint({"a": 1, "b": [1]}) == settings_fingerprint({"b": [1], "a": 1})
    assert settings_fingerprint({"a": 1}) != settings_fingerprint({"a": 2})


def test_stale_artifact_refused_naming_what_changed(tmp_path, fp):
    store = ArtifactStore(tmp_path)
    store.open("eig", fp).save({"x": torch.ones(2)})
    stale = {**fp, "data": "0" * 64}
    with pytest.raises(ArtifactError, match=r"stale: its data fingerprint.*overwrite=True"):
        store.open("eig", stale)
    with pytest.raises(ArtifactError, match="settings"):
        store.open("eig", {**fp, "settings": "1" * 64})
    fresh = store.open("eig", stale, overwrite=True)
    assert not fresh.complete and not (tmp_path / "eig" / "tensors.safetensors").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupted_file_refused(tmp_path, fp, damage):
    store = ArtifactStore(tmp_path)
    store.open("eig", fp).save({"x": torch.arange(100.0)})
    f = tmp_path / "eig" / "tensors.safetensors"
    blob = bytearray(f.read_bytes())
    if damage == "flip":
        blob[-1] ^= 0x01
        f.write_bytes(bytes(blob))
    elif damage == "truncate":
        f.write_bytes(bytes(blob[: len(blob) // 2]))
    else:
        f.unlink()
    with pytest.raises(ArtifactError, match="corrupted|missing"):
        store.open("eig", fp).load()


def test_corrupted_or_foreign_manifest_refused(tmp_path, fp):
    store = ArtifactStore(tmp_path)
    store.open("eig", fp).save({"x": torch.ones(1)})
    (tmp_path / "eig" / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        store.open("eig", fp)
    (tmp_path / "eig" / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        store.open("eig", fp)
    (tmp_path / "eig" / "manifest.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(ArtifactError, match="format"):
        store.open("eig", fp)


def test_chunks_resume_and_ignore_unrecorded_files(tmp_path, fp):
    store = ArtifactStore(tmp_path)
    art = store.open("proj", fp)
    art.write_chunk(0, {"G": torch.zeros(3, 2)})
    art.write_chunk(1, {"G": torch.ones(3, 2)})
    with pytest.raises(ArtifactError, match="incomplete"):
        list(art.iter_chunks())
    # a chunk file that was written but never recorded (killed before the manifest update)
    (tmp_path / "proj" / "chunk-000002.safetensors").write_bytes(b"garbage")
    reopened = store.open("proj", fp)
    assert reopened.done_chunks() == [0, 1] and not reopened.has_chunk(2)
    reopened.write_chunk(2, {"G": torch.full((2, 2), 2.0)})
    reopened.finish(chunks=3)
    out = [c["G"] for c in store.open("proj", fp).iter_chunks()]
    assert [float(g.mean()) for g in out] == [0.0, 1.0, 2.0]


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write(target, b"old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temp file left behind


def test_invalid_name(tmp_path, fp):
    with pytest.raises(ArtifactError, match="invalid artifact name"):
        ArtifactStore(tmp_path).open("../x", fp)


# --------------------------------------------------------------------------- trees (no pickle)
@dataclasses.dataclass
class _Result:
    values: torch.Tensor
    epsilon: float
    label: str = "x"


def test_tree_round_trip_exact_without_pickle(tmp_path, fp, monkeypatch):
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    base = torch.arange(10.0)
    tree = {
        "model": model.state_dict(), "optimizer": opt.state_dict(),
        "floats": [0.1, -0.0, float("inf"), 1e-300], "misc": (None, True, 3, "s", 2**40),
        "views": [base[:5], base[5:], base[::2]],  # shared storage, non-contiguous
        "dtypes": [torch.tensor([1, 2], dtype=torch.int8), torch.tensor([True]),
                   torch.ones(2, dtype=torch.bfloat16), torch.zeros(0, 3)],
        "result": _Result(torch.ones(2, dtype=torch.float64), 1e-3),
        7: {"nested": {(1, "a"): 2.5}},
    }

    def no_pickle(*args, **kwargs):
        raise AssertionError("the store must not pickle")

    monkeypatch.setattr(torch, "save", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    store = ArtifactStore(tmp_path)
    store.open("tree", fp).save(tree)
    back = store.open("tree", fp).load()
    assert back["floats"] == tree["floats"] and str(back["floats"][1]) == "-0.0"
    assert back["misc"] == tree["misc"] and back[7] == tree[7]
    assert all(torch.equal(a, b) and a.dtype == b.dtype
               for a, b in zip(back["views"] + back["dtypes"], tree["views"] + tree["dtypes"]))
    assert isinstance(back["result"], _Result) and back["result"].epsilon == 1e-3
    assert torch.equal(back["result"].values, tree["result"].values)
    fresh = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    fresh.load_state_dict(back["model"])
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                 model.state_dict().values()))
    opt2 = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    assert unpack_tree(pack_tree({"a": 1})) == {"a": 1}
    with pytest.raises(ArtifactError, match=r"cannot store the value\['bad'\]: a object"):
        pack_tree({"bad": object()})


# --------------------------------------------------------------------------- reliability
def test_files_follow_the_umask(tmp_path, fp):
    old = os.umask(0o022)
    try:
        ArtifactStore(tmp_path).open("eig", fp).save({"x": torch.ones(2)})
        atomic_write(tmp_path / "plain.txt", b"hi")
    finally:
        os.umask(old)
    for f in ["eig/manifest.json", "eig/tensors.safetensors", "plain.txt"]:
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == 0o644, f  # not 0600


def test_store_root_that_is_a_file(tmp_path, fp):
    f = tmp_path / "store"
    f.write_text("not a folder")
    with pytest.raises(ArtifactError, match=f"{f}.*regular file"):
        ArtifactStore(f).open("eig", fp)
    with pytest.raises(ArtifactError, match="regular file"):
        ArtifactStore(f / "sub").open("eig", fp)  # a file above the store folder


def test_read_only_incomplete_artifact_says_read_only(tmp_path, fp, monkeypatch):
    store = ArtifactStore(tmp_path)
    store.open("proj", fp).write_chunk(0, {"G": torch.ones(2)})
    folder = tmp_path / "proj"
    folder.chmod(0o555)
    try:
        if os.geteuid() == 0:  # root writes anywhere: make the folder look read-only
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, mode, **kw: (
                False if Path(p) == folder and mode & os.W_OK else real(p, mode, **kw)))
        with pytest.raises(ArtifactError, match="read-only") as e:
            store.open("proj", fp)
        assert "corrupt" not in str(e.value) and "Delete" not in str(e.value)
    finally:
        folder.chmod(0o755)


def test_unreadable_files_are_not_called_corrupted(tmp_path, fp, monkeypatch):
    store = ArtifactStore(tmp_path)
    store.open("eig", fp).save({"x": torch.ones(2)})

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr(Path, "read_text", denied)
        with pytest.raises(ArtifactError, match="permission denied.*not damaged") as e:
            store.open("eig", fp)
        assert "corrupt" not in str(e.value)
    art = store.open("eig", fp)
    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ArtifactError, match="permission denied.*not damaged"):
        art.load()


def test_overwrite_repairs_a_damaged_manifest(tmp_path, fp):
    store = ArtifactStore(tmp_path)
    store.open("eig", fp).save({"x": torch.ones(1)})
    manifest = tmp_path / "eig" / "manifest.json"
    for damage in ("{not json", json.dumps({"format": 99}), None):
        if damage is None:
            manifest.unlink()
        else:
            manifest.write_text(damage)
        with pytest.raises(ArtifactError, match="overwrite=True"):
            store.open("eig", fp)
        fresh = store.open("eig", fp, overwrite=True)  # as the message suggests
        assert not fresh.complete
        fresh.save({"x": torch.ones(1)})
    (tmp_path / "eig" / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="refusing to delete.*notes.txt"):
        store.open("eig", {**fp, "data": "0"}, overwrite=True)
    assert (tmp_path / "eig" / "notes.txt").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_checksums_are_verified_when_opened(tmp_path, fp, damage):
    store = ArtifactStore(tmp_path)
    art = store.open("proj", fp)
    for i in range(3):
        art.write_chunk(i, {"G": torch.full((4,), float(i))})
    art.finish(chunks=3)
    f = tmp_path / "proj" / "chunk-000001.safetensors"
    blob = bytearray(f.read_bytes())
    if damage == "flip":
        blob[-1] ^= 0x01
        f.write_bytes(bytes(blob))
    elif damage == "truncate":
        f.write_bytes(bytes(blob[:10]))
    else:
        f.unlink()
    with pytest.raises(ArtifactError, match="chunk-000001.*(corrupted|missing)"):
        store.open("proj", fp)  # at once, before any chunk is read


# ------------------------------------------------------------------- what fingerprints cover
def _mlp(activation: type[nn.Module] = nn.Tanh) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), activation(), nn.Linear(8, 3))


def _smoothed(smoothing: float):
    def loss(outputs, batch):
        return F.cross_entropy(outputs, batch[1], reduction="none", label_smoothing=smoothing)

    return loss


def build_task() -> ik.Task:
    """A task rebuilt from scratch (also in another process by the stability test)."""
    return ik.Task(_mlp(), loss=_smoothed(0.1), measurement=functools.partial(_margin, scale=2.0))


def _margin(outputs, batch, scale=1.0):
    return -scale * outputs.gather(1, batch[1][:, None]).squeeze(1)


def _stale_component(old: dict, new: dict, tmp_path) -> str:
    store = ArtifactStore(tmp_path / "s")
    store.open("a", old, overwrite=True).save({"x": torch.ones(1)})
    with pytest.raises(StaleArtifactError) as e:
        store.open("a", new)
    assert f"its {' and '.join(e.value.changed)} fingerprint" in str(e.value)
    return " ".join(e.value.changed)


def test_loss_changes_are_refused(tmp_path):
    model = _mlp()
    base = fingerprint(task=ik.ClassificationTask(model))
    variants = [
        ik.Task(model, loss=_smoothed(0.1)),  # label smoothing in a closure
        ik.Task(model, loss=functools.partial(F.cross_entropy, reduction="none",
                                              label_smoothing=0.1)),
        ik.Task(model, loss=nn.CrossEntropyLoss(reduction="none", label_smoothing=0.1)),
        ik.ClassificationTask(model, measurement="margin"),
        ik.ClassificationTask(model, params=["2.weight"]),
        ik.ClassificationTask(model, eval_mode=False),
    ]
    fps = [fingerprint(task=t) for t in variants]
    assert len({fp["task"] for fp in [base, *fps]}) == len(fps) + 1
    for fp in fps:
        assert _stale_component(base, fp, tmp_path) == "task"
    # a changed closure constant, partial argument or module attribute
    assert fingerprint(task=ik.Task(model, loss=_smoothed(0.2)))["task"] != fps[0]["task"]
    assert fingerprint(task=ik.Task(model, loss=nn.CrossEntropyLoss(
        reduction="none", label_smoothing=0.2)))["task"] != fps[2]["task"]


def test_architecture_changes_with_the_same_state_dict_are_refused(tmp_path):
    tanh, relu = _mlp(nn.Tanh), _mlp(nn.ReLU)
    relu.load_state_dict(tanh.state_dict())
    a, b = fingerprint(model=tanh), fingerprint(model=relu)
    assert a["model"] == b["model"] and a["architecture"] != b["architecture"]
    assert _stale_component(a, b, tmp_path) == "architecture"
    frozen = _mlp()
    frozen[0].weight.requires_grad_(False)  # what trains is part of the architecture
    assert fingerprint(model=frozen)["architecture"] != a["architecture"]
    hooked = _mlp()
    hooked[1].register_forward_hook(lambda module, args, out: 2 * out)
    assert fingerprint(model=hooked)["architecture"] != a["architecture"]


def _import(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


USER_CODE = '''
import torch
from torch import nn

SCALE = {scale}


def act(x):
    return torch.{act}(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return {net}


def forward(model, batch):
    return {fwd}
'''


def test_changed_user_code_is_refused(tmp_path):
    """Edited code, the same weights: the module's forward, a helper it calls, a global it reads,
    the task's forward function."""
    net, fwd = "SCALE * act(self.lin(x))", "model(batch[0]) / SCALE"
    versions = [("tanh", 1.0, net, fwd), ("relu", 1.0, net, fwd), ("tanh", 2.0, net, fwd),
                ("tanh", 1.0, "act(self.lin(x))", fwd), ("tanh", 1.0, net, "model(batch[0])")]
    fps = []
    for i, (act, scale, net_code, fwd_code) in enumerate(versions):
        path = tmp_path / f"v{i}" / "user_net.py"
        path.parent.mkdir()
        path.write_text(USER_CODE.format(act=act, scale=scale, net=net_code, fwd=fwd_code))
        mod = _import(path, "user_net")
        fps.append(fingerprint(task=ik.Task(mod.Net(), loss=_smoothed(0.0), forward=mod.forward)))
    assert len({fp["model"] for fp in fps}) == 1
    assert _stale_component(fps[0], fps[1], tmp_path) == "architecture"  # the helper act()
    assert _stale_component(fps[0], fps[2], tmp_path) == "architecture task"  # the global SCALE
    assert _stale_component(fps[0], fps[3], tmp_path) == "architecture"  # Net.forward
    assert _stale_component(fps[0], fps[4], tmp_path) == "task"  # the task's forward


def test_rebuilt_task_has_the_same_fingerprint_in_another_process():
    here = fingerprint(task=build_task(), settings={"set": {"b", "a"}, "dtype": torch.float64})
    assert fingerprint(task=build_task(), settings={"dtype": torch.float64,
                                                     "set": {"a", "b"}}) == here
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import torch; "
            "from test_store import build_task; from influencekit.store import fingerprint; "
            "print(json.dumps(fingerprint(task=build_task(), "
            "settings={'set': {'a', 'b'}, 'dtype': torch.float64})))")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "random"})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here


def test_what_cannot_be_fingerprinted_is_refused():
    lock = threading.Lock()

    def loss(outputs, batch):
        with lock:
            return F.cross_entropy(outputs, batch[1], reduction="none")

    with pytest.raises(ArtifactError, match=r"cannot fingerprint task\.loss_fn.*closure 'lock'"
                                            r".*memory address.*store=None"):
        fingerprint(task=ik.Task(_mlp(), loss=loss))
    assert len(hash_value(lambda x: x, nn.Tanh(), {1: [torch.ones(2)]})) == 64
