"""`wrapper fetch` as real processes: two at once on one cache, a full disk, exit codes; serve's model step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.acquire_fixtures import FILE, REPO_ID, hub_environ, hub_settings, write_registry
from tests.hubserver import HubServer
from wrapper.launch.prepare import prepare
from wrapper.model import acquire

WRAPPER = str(Path(sys.executable).parent / "wrapper")


@pytest.fixture
def served(hub: HubServer, tiny_dense: Path) -> HubServer:
    hub.add_file(REPO_ID, FILE, tiny_dense)
    return hub


def _registry(tmp_path: Path, model_root: Path) -> Path:
    body = {"hf_repo_id": REPO_ID, "hf_filename": FILE, "model_root": str(model_root)}
    return write_registry(tmp_path / "profiles.yaml", {"tiny": {"llamacpp": body}})


def _env(tmp_path: Path, hub: HubServer, model_root: Path) -> dict[str, str]:
    env = hub_environ(tmp_path, hub, PATH=os.environ.get("PATH", ""), LLM_PROFILE_NAME="tiny",
                      LLM_PROFILES_CONFIG_PATH=str(_registry(tmp_path, model_root)))
    return env


def _fetch(env: dict[str, str], prefix: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    return subprocess.Popen([*prefix, WRAPPER, "fetch", "--json"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_processes_fetch_once_and_agree(served: HubServer, tiny_dense: Path, tmp_path: Path) -> None:
    served.faults.throttle_s = 0.4  # ~3 s for the 0.5 MB model: the second process starts while it runs
    env = _env(tmp_path, served, tmp_path / "models")
    procs = [_fetch(env) for _ in range(2)]
    outs = [p.communicate(timeout=90) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    results = [json.loads(out) for out, _ in outs]
    assert results[0]["sha256"] == results[1]["sha256"] == acquire.sha256_file(tiny_dense)
    assert {r["source"] for r in results} == {"downloaded", "verified-cache"}
    assert len([r for r in served.body_requests() if r[1].startswith("/_lfs/")]) == 1  # no double download
    assert any("waiting up to" in err and FILE in err for _, err in outs)
    assert (tmp_path / "models" / FILE).read_bytes() == tiny_dense.read_bytes()


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=False,
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the size-limit test still runs")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_tiny_disk_fails_before_download_exit_3(served: HubServer, tmp_path: Path, tiny_tmpfs: Path) -> None:
    proc = _fetch(_env(tmp_path, served, tiny_tmpfs / "gguf"))
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert "not enough disk space" in err and str(tiny_tmpfs) in err
    assert served.body_requests() == []


def test_disk_full_mid_download_is_exit_3_and_resumable(served: HubServer, tiny_dense: Path, tmp_path: Path) -> None:
    # A file-size limit (ulimit -f, in 1 kB blocks) makes every write past 200 kB fail with EFBIG, as a
    # filling disk fails with ENOSPC; Python ignores SIGXFSZ, so the write raises instead of killing us.
    env = _env(tmp_path, served, tmp_path / "models")
    proc = _fetch(env, prefix=("bash", "-c", 'ulimit -f 200 && exec "$@"', "limited"))
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert "disk full while downloading" in err and "Traceback" not in err
    assert not (tmp_path / "models" / FILE).exists()
    assert [p for p in (tmp_path / "models").iterdir() if p.name.endswith(".part")]

    proc = _fetch(env)  # room again: the next run resumes the partial file
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out)["sha256"] == acquire.sha256_file(tiny_dense)
    assert any(r and r.startswith("bytes=") for _, path, r, _ in served.body_requests())


def test_fetch_cli_404_is_exit_3_with_listing(served: HubServer, tmp_path: Path) -> None:
    env = _env(tmp_path, served, tmp_path / "models")
    registry = write_registry(tmp_path / "bad.yaml", {"tiny": {"llamacpp": {
        "hf_repo_id": REPO_ID, "hf_filename": "missing.gguf", "model_root": str(tmp_path / "models")}}})
    env["LLM_PROFILES_CONFIG_PATH"] = str(registry)
    done = subprocess.run([WRAPPER, "fetch"], check=False, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert f"error: {REPO_ID} has no file 'missing.gguf' at revision 'main'" in done.stderr
    assert f"hint: the repo has: {FILE}" in done.stderr


def test_serve_prepare_downloads_verifies_and_puts_the_model_in_argv(
    served: HubServer, tiny_dense: Path, tmp_path: Path, llama_server_bin: str
) -> None:
    env = hub_environ(tmp_path, served, LLAMA_SERVER_BIN=llama_server_bin)
    s = hub_settings(tmp_path, served, env)
    prepared = prepare(s, fetch=True)
    target = tmp_path / "models" / FILE
    assert prepared.model_file == target
    assert target.read_bytes() == tiny_dense.read_bytes()
    assert acquire.marker_path(target).is_file()
    assert str(target) in prepared.command.argv
