"""The model store (pull, list, rm, -m NAME) against a local stand-in for the Hugging Face hub.

huggingface_hub.snapshot_download / hf_hub_download are replaced by functions that serve local
folders and raise the errors huggingface_hub raises: RepositoryNotFoundError for an unknown repo,
LocalEntryNotFoundError for a cache miss under HF_HUB_OFFLINE.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bitnet_run import store
from bitnet_run.cli import app
from bitnet_run.convert import hub as hub_module

runner = CliRunner()
DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "models" / "demo"  # a real 2B-4T-format checkpoint


def _repo_not_found(repo_id: str):
    from huggingface_hub import errors

    http = importlib.import_module(errors.HfHubHTTPError.__mro__[1].__module__)  # httpx or its fork
    url = f"https://huggingface.co/api/models/{repo_id}"
    return errors.RepositoryNotFoundError(f"404 Repository Not Found for url: {url}",
                                          response=http.Response(404, request=http.Request("GET", url)))


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fake hub: {repo id: local folder}; the store in a temporary $BITNET_RUN_HOME."""
    import huggingface_hub
    from huggingface_hub import errors

    repos = {"test/tiny": DEMO_CHECKPOINT}
    cached = set()  # repos "downloaded" once: what HF_HUB_OFFLINE may still serve
    calls = []

    def serve(repo_id: str) -> Path:
        if repo_id not in cached and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise errors.LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")
        if repo_id not in repos:
            raise _repo_not_found(repo_id)
        cached.add(repo_id)
        return repos[repo_id]

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(serve(repo_id))

    def hf_hub_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        path = serve(repo_id) / filename
        if not path.is_file():
            raise errors.EntryNotFoundError(f"{filename} not found in {repo_id}")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setenv("BITNET_RUN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return type("Hub", (), {"repos": repos, "calls": calls, "home": tmp_path / "home"})


def _store_folders(home: Path) -> list[str]:
    root = home / "models"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def test_pull_list_run_rm(hub, tmp_path, monkeypatch):
    result = runner.invoke(app, ["pull", "test/tiny"])
    assert result.exit_code == 0, result.output
    assert hub.calls[0] == ("test/tiny", hub_module.ALLOW_PATTERNS)

    monkeypatch.chdir(tmp_path)  # the store does not depend on the current folder
    listing = runner.invoke(app, ["list"])
    assert listing.exit_code == 0, listing.output
    header, row = listing.stdout.strip().splitlines()
    assert header.split() == ["NAME", "FAMILY", "PARAMETERS", "ENCODING", "SIZE", "SOURCE", "CONVERTED"]
    assert row.split()[:3] == ["test/tiny", "bitnet", store.human_count(_parameter_count(hub))]
    assert "I2" in row and "hf://test/tiny" in row

    run = runner.invoke(app, ["run", "-m", "test/tiny", "-p", "Hello", "-n", "4", "--temp", "0"])
    assert run.exit_code == 0, run.output
    show = runner.invoke(app, ["show", "-m", "test/tiny"])
    assert show.exit_code == 0 and "general.source" in show.stdout

    removed = runner.invoke(app, ["rm", "test/tiny"])
    assert removed.exit_code == 0, removed.output
    assert _store_folders(hub.home) == []
    again = runner.invoke(app, ["run", "-m", "test/tiny", "-p", "x"])
    assert again.exit_code == 1 and "no model of that name" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def _parameter_count(hub) -> int:
    import math

    from bitnet_run import fileformat as ff

    entry = store.find("test/tiny")
    return sum(math.prod(t.dims) for t in ff.read_header(entry.path).tensors)


def test_pull_with_encodings_is_its_own_name(hub):
    for args in (["--weights", "tl2"], ["--head", "q8"]):
        result = runner.invoke(app, ["pull", "test/tiny", *args])
        assert result.exit_code == 0, result.output
    assert [e.name for e in store.entries()] == ["test/tiny:q8", "test/tiny:tl2"]
    rows = {r["name"]: r for r in map(store.describe, store.entries())}
    assert rows["test/tiny:tl2"]["encoding"].startswith("TL2") and "Q8_R" in rows["test/tiny:q8"]["encoding"]


def test_offline_and_missing_repo_are_one_line_and_leave_nothing(hub, monkeypatch):
    missing = runner.invoke(app, ["pull", "test/nope"])
    assert missing.exit_code == 1 and "no such repo" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = runner.invoke(app, ["pull", "test/tiny"])
    assert offline.exit_code == 1 and "HF_HUB_OFFLINE" in offline.stderr
    assert len(offline.stderr.strip().splitlines()) == 1
    assert _store_folders(hub.home) == []

    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert runner.invoke(app, ["pull", "test/tiny"]).exit_code == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # now in the (fake) cache: offline pulls work
    assert runner.invoke(app, ["pull", "test/tiny", "--weights", "tl1"]).exit_code == 0


def test_interrupted_pull_leaves_nothing_listed(hub):
    import contextlib

    @contextlib.contextmanager
    def interrupting(description):
        def report(done, total, name):
            if done == 3:
                raise KeyboardInterrupt

        yield report

    with pytest.raises(KeyboardInterrupt):
        store.pull("test/tiny", reporting=interrupting)
    assert store.entries() == [] and _store_folders(hub.home) == []

    # an older model of the same name survives a failed re-pull
    store.pull("test/tiny")
    with pytest.raises(KeyboardInterrupt):
        store.pull("test/tiny", reporting=interrupting)
    assert [e.name for e in store.entries()] == ["test/tiny"] and _store_folders(hub.home) == ["test--tiny"]


def test_pull_gguf_file(hub, tmp_path):
    from gguf_checkpoints import write_gguf

    folder = tmp_path / "gguf-repo"
    folder.mkdir()
    write_gguf(DEMO_CHECKPOINT, folder / "ggml-model-i2_s.gguf")
    hub.repos["test/tiny-gguf"] = folder
    result = runner.invoke(app, ["pull", "test/tiny-gguf"])
    assert result.exit_code == 0, result.output
    assert hub.calls[-1] == ("test/tiny-gguf", "ggml-model-i2_s.gguf")
    missing = runner.invoke(app, ["pull", "test/tiny-gguf", "--file", "other.gguf"])
    assert missing.exit_code == 1 and "other.gguf" in missing.stderr
    assert [e.name for e in store.entries()] == ["test/tiny-gguf"]
    bench = runner.invoke(app, ["bench", "-m", "test/tiny-gguf", "-p", "8", "-n", "2", "-r", "1", "-t", "1",
                                "--no-warmup", "--membw-mib", "1"])
    assert bench.exit_code == 0, bench.output
    assert "test/tiny-gguf" in bench.stdout


def test_run_gguf_file_imports_once(hub, tmp_path):
    from gguf_checkpoints import write_gguf

    path = write_gguf(DEMO_CHECKPOINT, tmp_path / "tiny.gguf")
    args = ["run", "-m", str(path), "-p", "Hello", "-n", "4", "--temp", "0"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    (entry,) = store.entries()
    stamp = entry.path.stat().st_mtime_ns
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and second.stdout == first.stdout
    assert store.entries()[0].path.stat().st_mtime_ns == stamp  # reused, not converted again
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))  # the file changed: converted again
    assert runner.invoke(app, args).exit_code == 0
    assert store.entries()[0].path.stat().st_mtime_ns != stamp
