"""Every verified read checks sha256: a flipped byte is an IntegrityError naming the file and ref."""

from __future__ import annotations

from pathlib import Path

import pytest

from cladapt.errors import IntegrityError, NotFound
from cladapt.registry.store import Store


def flip_byte(path: Path, offset: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("relpath", "read"),
    [
        ("adapter/adapter_model.safetensors", lambda s: s.adapter_dir("amazon@1")),
        ("adapter/adapter_config.json", lambda s: s.adapter_dir("amazon")),
        ("sidecars/router.json", lambda s: s.read_json("amazon@1", "router.json")),
        ("sidecars/router.json", lambda s: s.sidecar_path("amazon@1", "router.json")),
        ("sidecars/basis.safetensors", lambda s: s.read_tensors("amazon@1", "basis.safetensors")),
        ("sidecars/basis.safetensors", lambda s: s.sidecar_path("amazon@1", "basis.safetensors")),
    ],
)
def test_bit_flip_is_caught_on_read_and_by_verify(store: Store, commit, relpath: str, read) -> None:
    rec = commit("amazon", tensors=True)
    read(store)  # clean read passes
    flip_byte(rec.path / relpath, offset=3)
    with pytest.raises(IntegrityError) as info:
        read(store)
    assert relpath in str(info.value)
    assert "amazon@1" in str(info.value)
    problems = store.verify()
    assert len(problems) == 1
    assert problems[0].where == "amazon@1" and relpath in problems[0].message


def test_truncated_and_missing_files(store: Store, commit) -> None:
    rec = commit("amazon")
    (rec.path / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(IntegrityError, match="adapter_model.safetensors"):
        store.adapter_dir("amazon")
    (rec.path / "sidecars" / "router.json").unlink()
    with pytest.raises(IntegrityError, match="router.json"):
        store.read_json("amazon", "router.json")
    assert len(store.verify()) == 2


def test_unlisted_file_in_adapter_dir_is_refused(store: Store, commit) -> None:
    rec = commit("amazon")
    (rec.path / "adapter" / "adapter_model.bin").write_bytes(b"a pickle PEFT would load")
    with pytest.raises(IntegrityError, match="adapter_model.bin"):
        store.adapter_dir("amazon")
    assert any("adapter_model.bin" in p.message for p in store.verify())


def test_unknown_and_unsafe_reads(store: Store, commit) -> None:
    commit("amazon")
    with pytest.raises(NotFound) as info:
        store.sidecar_path("amazon", "nope.safetensors")
    assert "router.json" in (info.value.hint or "")
    with pytest.raises(NotFound):
        store.read_json("amazon", "sidecars/nope.json")
    for bad in ["../../../etc/passwd", "/etc/passwd", "sidecars/../manifest.json"]:
        with pytest.raises(Exception) as exc_info:
            store.read_json("amazon", bad)
        assert "invalid" in str(exc_info.value)
    for bad in ["../x", "a/b", ".."]:
        with pytest.raises(Exception, match="invalid sidecar name"):
            store.sidecar_path("amazon", bad)


def test_corrupt_manifest_is_reported(store: Store, commit) -> None:
    commit("amazon")
    rec2 = commit("amazon")
    (rec2.path / "manifest.json").write_text("{not json")
    reopened = Store.open(store.root)
    problems = reopened.verify(reindex=True)
    assert any(p.where == "amazon@2" and "manifest" in p.message for p in problems)
    # The sound version is still listed and readable; the broken one is not served.
    assert [str(r.ref) for r in reopened.list()] == ["amazon@1"]
    assert reopened.adapter_dir("amazon@1").is_dir()
