"""Names and refs: the grammar, and that nothing unsafe becomes a path component."""

from __future__ import annotations

import pytest

from cladapt.errors import RegistryError
from cladapt.registry.refs import (
    AdapterRef,
    validate_filename,
    validate_relpath,
    validate_shared_key,
    validate_task_name,
)


@pytest.mark.parametrize("name", ["amazon", "A", "yelp_2", "db-pedia", "x" * 64, "0task"])
def test_valid_task_names(name: str) -> None:
    assert validate_task_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "..", ".", "a.b", "a/b", "/abs", "../x", "-lead", "_lead", "x" * 65, "sp ace", "tab\t", "amazon\n", "é", "a\\b"],
)
def test_bad_task_names_raise_naming_the_name(name: str) -> None:
    with pytest.raises(RegistryError) as info:
        validate_task_name(name)
    assert repr(name) in str(info.value)
    assert info.value.hint


@pytest.mark.parametrize(
    ("text", "task", "version", "latest"),
    [
        ("amazon", "amazon", None, False),
        ("amazon@3", "amazon", 3, False),
        ("amazon@v12", "amazon", 12, False),
        ("amazon@active", "amazon", None, False),
        ("amazon@latest", "amazon", None, True),
    ],
)
def test_parse(text: str, task: str, version: int | None, latest: bool) -> None:
    ref = AdapterRef.parse(text)
    assert (ref.task, ref.version, ref.latest) == (task, version, latest)


@pytest.mark.parametrize("text", ["amazon@0", "amazon@-1", "amazon@x", "amazon@", "@3", "a.b@1", "amazon@03", "amazon@1@2", "amazon@3\n"])
def test_parse_rejects(text: str) -> None:
    with pytest.raises(RegistryError):
        AdapterRef.parse(text)


def test_str_round_trip_and_peft_name() -> None:
    for text in ["amazon", "amazon@3", "amazon@latest"]:
        assert str(AdapterRef.parse(text)) == text
    ref = AdapterRef("amazon", 3)
    assert ref.peft_name == "amazon__v3"
    assert "." not in ref.peft_name
    assert AdapterRef.from_peft_name("amazon__v3") == ref
    assert AdapterRef.from_peft_name("my__task__v10") == AdapterRef("my__task", 10)
    with pytest.raises(RegistryError):
        _ = AdapterRef("amazon").peft_name
    with pytest.raises(RegistryError):
        AdapterRef.from_peft_name("amazon")


def test_constructor_validates() -> None:
    with pytest.raises(RegistryError):
        AdapterRef("../etc", 1)
    with pytest.raises(RegistryError):
        AdapterRef("amazon", 0)
    with pytest.raises(RegistryError):
        AdapterRef("amazon", True)  # type: ignore[arg-type]
    with pytest.raises(RegistryError):
        AdapterRef("amazon", 2, latest=True)
    assert AdapterRef("amazon", 2) == AdapterRef.parse("amazon@2")
    assert hash(AdapterRef("amazon", 2)) == hash(AdapterRef.parse("amazon@2"))


@pytest.mark.parametrize("path", ["adapter/adapter_config.json", "sidecars/basis.safetensors", "README.md", "a/b/c.json"])
def test_valid_relpaths(path: str) -> None:
    assert validate_relpath(path) == path


@pytest.mark.parametrize("path", ["", "/etc/passwd", "../x", "a/../b", "a//b", "./a", "a/.", ".hidden", "a\\b", "a/", "evil\n"])
def test_bad_relpaths(path: str) -> None:
    with pytest.raises(RegistryError):
        validate_relpath(path)


@pytest.mark.parametrize("name", ["a/b", "..", ".x", "", "/x"])
def test_bad_filenames(name: str) -> None:
    with pytest.raises(RegistryError):
        validate_filename(name)


def test_shared_keys() -> None:
    assert validate_shared_key("sha256-" + "a" * 64) == "sha256-" + "a" * 64
    assert validate_shared_key("smollm2.v1") == "smollm2.v1"
    for bad in ["..", "a..b", "a/b", ".a", "x" * 129, "a:b"]:
        with pytest.raises(RegistryError):
            validate_shared_key(bad)
