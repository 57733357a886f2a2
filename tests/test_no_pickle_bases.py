"""A base model folder whose weights are only ``pytorch_model.bin`` (a pickle) is refused, never unpickled."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch


def test_pickle_only_base_is_refused_naming_the_file(tiny_base_path: Path, tmp_path: Path, monkeypatch) -> None:
    from cladapt.base_model import load
    from cladapt.errors import ModelError

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_base_path, folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not-to-be-read")

    def no_unpickling(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("torch.load called on a base model")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ModelError, match=r"pytorch_model\.bin is a pickle"):
        load(str(folder))
