"""Image rows: parse and validate the images a data row refers to (``cladapt.data.rows`` calls in).

Two spellings, both by *local path*, relative to the data file's folder (a saved ``datasets``
folder: relative to that folder); URLs and inline data are refused, so training never touches
the network and a data set is reproducible from its files:

* chat rows: a message's ``content`` is a list of parts ``{"type": "text", "text": ...}`` and
  ``{"type": "image", "image": "img/1.png"}`` (``"path"`` or ``"url"`` with a local path also
  work, as in transformers' chat format); or ``content`` is a string and ``"images": [...]``;
* instruction rows: ``{"instruction", "input", "output", "image": "img/1.png"}`` (or a list).

Images become the message's ``images`` (absolute paths); a message's images are shown before
its text. Validation opens each file's header and checks its integrity once (``PIL`` verify) but
decodes no pixels: images are decoded when a batch is built. Every problem names file and line.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from cladapt.errors import Issue
from cladapt.vision import RGB_CONVERTIBLE

IMAGE_FIELDS = ("image", "images")
_PART_KEYS = ("image", "path", "url")


def base_dir(file: str) -> Path:
    """Where a data file's relative image paths start."""
    path = Path(file)
    return path if path.is_dir() else path.parent


@lru_cache(maxsize=65536)
def _check_file(path: str, mtime_ns: int) -> str | None:
    """None if ``path`` is a usable image, else the problem (cached by path and mtime)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            mode = img.mode
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"not a readable image ({exc})"
    if mode not in RGB_CONVERTIBLE:
        return f"image mode {mode} cannot be shown as RGB (16-bit or float image); save it as 8-bit RGB or greyscale"
    return None


def resolve_image(ref: Any, folder: Path, at: str, issues: list[Issue]) -> str | None:
    """The absolute path of one image reference, or None with an issue recorded."""
    if not isinstance(ref, str) or not ref.strip():
        issues.append(Issue(at, f"an image must be a non-empty path string, got {type(ref).__name__}"))
        return None
    if "://" in ref or ref.startswith("data:"):
        issues.append(Issue(at, f"image {ref!r}: only local files are supported (no URLs or inline data)"))
        return None
    path = Path(ref).expanduser()
    path = path if path.is_absolute() else folder / path
    if not path.is_file():
        issues.append(Issue(at, f"image {ref!r} not found (looked for {path})"))
        return None
    problem = _check_file(str(path.resolve()), path.stat().st_mtime_ns)
    if problem:
        issues.append(Issue(at, f"image {ref!r}: {problem}"))
        return None
    return str(path.resolve())


def image_list(value: Any, folder: Path, at: str, issues: list[Issue]) -> list[str] | None:
    """An ``image``/``images`` field (one path or a list) as absolute paths; None on any problem."""
    refs = value if isinstance(value, list) else [value]
    before = len(issues)
    out = [resolve_image(r, folder, at, issues) for r in refs]
    if len(issues) > before:
        return None
    return [p for p in out if p]


def parse_message(m: dict[str, Any], at: str, folder: Path, issues: list[Issue]) -> dict[str, Any] | None:
    """A chat message with images -> ``{"role", "content": text, "images": [abs paths]}``."""
    content = m.get("content")
    images: list[str] = []
    texts: list[str] = []
    before = len(issues)
    if isinstance(content, list):
        for k, part in enumerate(content):
            where = f"{at}.content[{k}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in ("image", "image_url"):
                ref = next((part[key] for key in _PART_KEYS if key in part), None)
                if kind == "image_url" and isinstance(ref, dict):
                    ref = ref.get("url")
                found = resolve_image(ref, folder, where, issues)
                if found:
                    images.append(found)
            else:
                issues.append(Issue(where, "a content part must be {'type': 'text', 'text': ...} or {'type': 'image', 'image': PATH}"))
    elif isinstance(content, str):
        texts.append(content)
    else:
        issues.append(Issue(at, f"content must be a string or a list of parts, got {type(content).__name__}"))
    if "images" in m:
        found_list = image_list(m["images"], folder, f"{at}.images", issues)
        images += found_list or []
    if len(issues) > before:
        return None
    if images and m.get("role") == "assistant":
        issues.append(Issue(at, "images are accepted in user and system messages, not in the assistant's answer"))
        return None
    out: dict[str, Any] = {"role": m["role"], "content": "\n".join(texts)}
    if images:
        out["images"] = images
    return out


def has_images(m: Any) -> bool:
    """Whether a raw chat message uses the image spellings (parts list or an ``images`` key)."""
    return isinstance(m, dict) and (isinstance(m.get("content"), list) or "images" in m)


def image_prompts(prompts: list[str], images: list[str], tokenizer: Any) -> list[list[dict[str, Any]]]:
    """One user turn per prompt, each showing ``images`` (paths relative to the working directory).

    What ``cladapt generate --image`` asks the model.

    Raises:
        DataError: an image is missing or unreadable, or the base model is text-only.
    """
    from cladapt.errors import DataError
    from cladapt.vision import processor_of

    issues: list[Issue] = []
    found = image_list(list(images), Path.cwd(), "--image", issues) if images else []
    if images and processor_of(tokenizer) is None:
        issues.append(Issue("--image", "the base model is text-only; images need a vision-language base"))
    if issues:
        raise DataError(issues)
    return [[{"role": "user", "content": p, **({"images": found} if found else {})}] for p in prompts]
