"""The model store: converted models kept by name in one folder, $BITNET_RUN_HOME/models.

Like Ollama's and the Hugging Face cache's, the store does not depend on the current folder. Each
model is one folder, models/<name with / and : as -->/, holding model.bnr and info.json (the name,
where it came from, when and how it was converted). A model is installed by writing it into a hidden
folder beside the others and renaming that into place, so an interrupted `pull` or import leaves
nothing `list` shows. Downloads themselves stay in the Hugging Face cache (resumable, shared with
other tools); only the converted files live here.

Names: `owner/repo` for a pulled repo, `owner/repo:TAG` when it was converted with a non-default
encoding or from one file of the repo (TAG = file stem, weights, head, joined by "-"), and
`gguf/<stem>-<8 hex>` for a local GGUF file run with -m FILE.gguf (imported once, reused while the
file's size and modification time are unchanged).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager

from .paths import models_dir

MODEL_FILE = "model.bnr"
INFO_FILE = "info.json"
PARTIAL_PREFIX = ".partial-"
GGUF_SUFFIX = ".gguf"

Progress = Callable[[int, int, str], None]
# A context manager factory (the CLI's progress bar): reporting(description) yields a Progress.
Reporting = Callable[[str], ContextManager[Progress]]


@contextlib.contextmanager
def _silent(description: str) -> Iterator[Progress | None]:
    yield None


@dataclass(frozen=True)
class Entry:
    """One stored model: its name, its model file and what info.json says about it."""

    name: str
    path: Path
    info: dict

    @property
    def folder(self) -> Path:
        return self.path.parent


def folder_name(name: str) -> str:
    return name.replace("/", "--").replace(":", "--")


def entries() -> list[Entry]:
    """Every complete model in the store, sorted by name (hidden, partial folders are not models)."""
    root = models_dir()
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        if folder.name.startswith(".") or not (folder / MODEL_FILE).is_file():
            continue
        try:
            info = json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and isinstance(info.get("name"), str):
            found.append(Entry(info["name"], folder / MODEL_FILE, info))
    return sorted(found, key=lambda e: e.name)


def find(name: str) -> Entry | None:
    for entry in entries():
        if entry.name == name:
            return entry
    return None


def install(name: str, info: dict, write: Callable[[Path], object]) -> Entry:
    """Store `name`: write(path of the new model file) inside a hidden folder, then info.json, then
    rename the folder into place (replacing an older model of that name). On any failure or
    interruption the hidden folder is removed and the store is as it was."""
    root = models_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = root / folder_name(name)
    partial = root / f"{PARTIAL_PREFIX}{folder_name(name)}.{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        write(partial / MODEL_FILE)
        info = {"name": name, **info, "converted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (partial / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if final.exists():
            old = root / f"{PARTIAL_PREFIX}{folder_name(name)}.{os.getpid()}.old"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return Entry(name, final / MODEL_FILE, info)


def remove(name: str) -> Entry:
    entry = find(name)
    if entry is None:
        raise FileNotFoundError(f"{name}: no model of that name in the store {models_dir()} (see `bitnet-run list`)")
    shutil.rmtree(entry.folder)
    return entry


# --------------------------------------------------------------------------- pull and import


def pull_name(repo_id: str, file: str | None = None, weights: str = "i2", head: str | None = None) -> str:
    tag = [Path(file).stem] if file else []
    tag += [weights] if weights != "i2" else []
    tag += [head] if head else []
    return repo_id + (":" + "-".join(tag) if tag else "")


def is_gguf_repo(repo_id: str, file: str | None) -> bool:
    return file is not None or "gguf" in repo_id.lower()


def pull(repo_id: str, file: str | None = None, weights: str = "i2", head: str | None = None,
         reporting: Reporting = _silent, output: Path | None = None) -> Path:
    """Download `repo_id` (its checkpoint files, or one GGUF file of it) and convert it into the
    store, or into the file `output` when given. Returns the model file written.

    A repo whose name says GGUF, or any repo with `file` given, is read as a GGUF file: `file`,
    default hub.DEFAULT_GGUF_FILE. Raises ConversionError (one line) for a repo that cannot be
    fetched or converted; nothing is left behind then."""
    from .convert import convert_checkpoint, hub

    name = pull_name(repo_id, file, weights, head)  # a defaulted file is not part of the name
    if is_gguf_repo(repo_id, file):
        from .convert.gguf_import import convert_gguf

        file = file or hub.DEFAULT_GGUF_FILE
        source, convert = hub.download_file(repo_id, file), convert_gguf
    else:
        hub.download_snapshot(repo_id)  # before the bar; converting by repo id reuses the cached snapshot
        source, convert = repo_id, convert_checkpoint
    with reporting("converting") as report:
        def write(out: Path) -> Path:
            return convert(source, out, report, weights=weights, head=head)

        if output is not None:
            return write(output)
        info = {"source": f"hf://{repo_id}" + (f"/{file}" if file else ""), "weights": weights, "head": head}
        return install(name, info, write).path


def _gguf_identity(path: Path) -> dict:
    stat = path.stat()
    return {"file": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def import_gguf(path: Path, reporting: Reporting = _silent) -> Entry:
    """The stored conversion of a local GGUF file, converted now if it is not there or the file changed."""
    from .convert.gguf_import import convert_gguf

    path = path.resolve()
    name = f"gguf/{path.stem}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    identity = _gguf_identity(path)
    entry = find(name)
    if entry is not None and entry.info.get("gguf") == identity:
        return entry
    info = {"source": str(path), "weights": "i2", "head": None, "gguf": identity}
    with reporting(f"importing {path.name}") as report:
        return install(name, info, lambda out: convert_gguf(path, out, report))


def resolve_model(spec: str | os.PathLike, reporting: Reporting = _silent) -> Path:
    """The model file a `-m` argument names: a .bnr path as is; a .gguf path converted once into the
    store; else the name of a stored model. Raises FileNotFoundError (one line) for anything else,
    ConversionError for a GGUF file that cannot be converted."""
    path = Path(spec).expanduser()
    if path.is_file():
        return import_gguf(path, reporting).path if path.suffix.lower() == GGUF_SUFFIX else path
    entry = find(str(spec))
    if entry is not None:
        return entry.path
    if path.exists():
        raise FileNotFoundError(f"{spec}: is not a model file")
    raise FileNotFoundError(f"{spec}: no such model file, and no model of that name in the store "
                            f"{models_dir()} (see `bitnet-run list`)")


# --------------------------------------------------------------------------- describing a model


def describe(entry: Entry) -> dict:
    """The `list` row of a stored model, read from its file header: family, parameters, encoding, size."""
    from . import fileformat as ff

    row = {"name": entry.name, "source": entry.info.get("source", ""),
           "converted": entry.info.get("converted", "").replace("T", " ").removesuffix("Z")}
    try:
        header = ff.read_header(entry.path)
    except (OSError, ValueError) as exc:
        return {**row, "family": "?", "parameters": "?", "encoding": f"unreadable ({exc})", "size": "?"}
    linear = sorted({t.encoding_name for t in header.tensors if t.encoding in ff.TERNARY_ENCODINGS})
    head_names = ("lm_head.weight", "model.embed_tokens.weight")
    head = next((t.encoding_name for n in head_names for t in header.tensors if t.name == n), "?")
    count = sum(math.prod(t.dims) for t in header.tensors)
    return {**row, "family": str(header.metadata.get("general.architecture", "?")),
            "parameters": human_count(count), "encoding": f"{'/'.join(linear) or '-'} (head {head})",
            "size": f"{entry.path.stat().st_size / 2**20:.1f} MiB"}


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
