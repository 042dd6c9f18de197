"""The artifact store: round trips, fingerprints, staleness, corruption, atomicity, resume."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from influencekit.errors import ArtifactError
from influencekit.store import (
    ArtifactStore,
    atomic_write,
    data_fingerprint,
    fingerprint,
    model_fingerprint,
    settings_fingerprint,
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
