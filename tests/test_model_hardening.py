"""Issue 15 items 4 and 7-13 against real faults: the Hub stand-in misbehaving, crafted GGUF headers, and
model paths that are FIFOs, loops or not there. Every failure is one line with exit 2 or 3."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.acquire_fixtures import FAST, FILE, REPO_ID, hub_environ, hub_settings, write_registry
from tests.hubserver import HubServer
from wrapper import settings
from wrapper.errors import ConfigError, ModelUnavailable, ModelVerificationFailed, exit_code_for
from wrapper.model import acquire, gguf_header, gguf_meta
from wrapper.model.transfer import Transfer, TransferFailed, fetch

WRAPPER = str(Path(sys.executable).parent / "wrapper")


@pytest.fixture
def served(hub: HubServer, tiny_dense: Path) -> HubServer:
    hub.add_file(REPO_ID, FILE, tiny_dense)
    return hub


def _bodies(hub: HubServer) -> list[str]:
    return [path for _, path, _, _ in hub.body_requests() if path.startswith("/_lfs/")]


# ---- 7: the verified marker binds repo and revision ---------------------------------------------------


def test_changed_repo_id_fetches_the_new_repos_bytes_not_the_cached_ones(
    served: HubServer, tiny_moe: Path, tmp_path: Path
) -> None:
    assert acquire.ensure(hub_settings(tmp_path, served), FAST).source == "downloaded"
    served.add_file("org/other-GGUF", FILE, tiny_moe)
    got = acquire.ensure(hub_settings(tmp_path, served, hf_repo_id="org/other-GGUF"), FAST)
    assert got.source == "downloaded" and got.path.read_bytes() == tiny_moe.read_bytes()
    assert got.sha256 == hashlib.sha256(tiny_moe.read_bytes()).hexdigest()


def test_changed_revision_is_checked_against_the_hub(
    served: HubServer, tiny_dense: Path, tiny_moe: Path, tmp_path: Path
) -> None:
    acquire.ensure(hub_settings(tmp_path, served), FAST)
    served.add_file(REPO_ID, FILE, tiny_dense, revision="v2")  # same bytes: re-verified, not re-fetched
    heads, bodies = len(served.requests), len(_bodies(served))
    got = acquire.ensure(hub_settings(tmp_path, served, hf_revision="v2"), FAST)
    assert got.source == "local" and len(served.requests) > heads and len(_bodies(served)) == bodies
    served.add_file(REPO_ID, FILE, tiny_moe, revision="v3")  # other bytes: fetched
    got = acquire.ensure(hub_settings(tmp_path, served, hf_revision="v3"), FAST)
    assert got.source == "downloaded" and got.path.read_bytes() == tiny_moe.read_bytes()
    assert acquire.ensure(hub_settings(tmp_path, served, hf_revision="v3"), FAST).source == "verified-cache"


# ---- 8: a read-only folder is verified against the Hub's hash ------------------------------------------


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "models"
    folder.mkdir()
    done = subprocess.run(["mount", "--bind", str(folder), str(folder)], check=False, capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here ({done.stderr.decode().strip()})")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_read_only_folder_with_a_flipped_byte_is_refused(
    served: HubServer, tiny_dense: Path, tmp_path: Path, read_only: Path
) -> None:
    data = bytearray(tiny_dense.read_bytes())
    data[len(data) - 100] ^= 0xFF  # in the tensor data: the header check alone cannot see it
    (read_only / FILE).write_bytes(bytes(data))
    subprocess.run(["mount", "-o", "remount,bind,ro", str(read_only)], check=True)
    assert not os.access(read_only, os.W_OK)
    with pytest.raises(ModelVerificationFailed, match="sha256 is") as err:
        acquire.ensure(hub_settings(tmp_path, served), FAST)
    assert hashlib.sha256(tiny_dense.read_bytes()).hexdigest() in err.value.message
    assert _bodies(served) == []  # nothing could be replaced, so nothing was downloaded


# ---- 9: a server that ignores Range and keeps dropping ---------------------------------------------------


def test_server_ignoring_range_and_dropping_gives_up_exit_3(served: HubServer, tmp_path: Path) -> None:
    served.faults.drop_at, served.faults.ignore_range = 100_000, True  # every request, from byte 0
    started = time.monotonic()
    with pytest.raises(ModelUnavailable, match="no progress") as err:
        acquire.ensure(hub_settings(tmp_path, served), FAST)
    assert exit_code_for(err.value) == 3 and "\n" not in err.value.message
    assert len(_bodies(served)) <= FAST.transfer.retries + 1 and time.monotonic() - started < 20


def test_total_requests_are_bounded_even_with_progress(served: HubServer, tiny_dense: Path, tmp_path: Path) -> None:
    served.faults.drop_at, served.faults.ignore_range = 100_000, True
    url = f"{served.cdn_url}/_lfs/{hashlib.sha256(tiny_dense.read_bytes()).hexdigest()}"
    with pytest.raises(TransferFailed, match="gave up after 2 requests"):
        fetch(url, tmp_path / "x.part", tiny_dense.stat().st_size, headers={}, progress=None,
              transfer=Transfer(stall_s=1, retries=50, backoff_s=0.01, max_attempts=2))


# ---- 10: metadata requests retry 5xx/429 -----------------------------------------------------------------


@pytest.mark.parametrize("status", [503, 429])
def test_busy_hub_metadata_is_retried(served: HubServer, tiny_dense: Path, tmp_path: Path, status: int) -> None:
    served.faults.busy, served.faults.busy_times = status, 2
    got = acquire.ensure(hub_settings(tmp_path, served), FAST)
    assert got.path.read_bytes() == tiny_dense.read_bytes()
    assert served.faults.busy_times == 0


def test_hub_that_stays_busy_is_one_line_exit_3(served: HubServer, tmp_path: Path) -> None:
    served.faults.busy, served.faults.busy_times = 502, 100
    with pytest.raises(ModelUnavailable, match="HTTP 502") as err:
        acquire.ensure(hub_settings(tmp_path, served), FAST)
    assert exit_code_for(err.value) == 3 and "\n" not in err.value.message


def test_header_range_read_retries_429(served: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_meta, "_BACKOFF_S", 0.01)
    served.faults.busy, served.faults.busy_times = 429, 2
    meta = gguf_meta.read_remote(gguf_meta.hub_url(served.url, REPO_ID, FILE))
    assert meta.n_layer > 0 and served.faults.busy_times == 0


# ---- 11: names that cannot be right are refused at load time ---------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("hf_filename", "x\0.gguf"), ("hf_repo_id", "../../admin"), ("hf_repo_id", "org/../admin"),
    ("hf_revision", "main\0"),
])
def test_bad_names_are_refused_when_the_profile_loads(tmp_path: Path, field: str, value: str) -> None:
    body = {"hf_repo_id": REPO_ID, "hf_filename": FILE, field: value}
    registry = write_registry(tmp_path / "p.yaml", {"tiny": {"llamacpp": body}})
    with pytest.raises(ConfigError) as err:
        settings.build("tiny", str(registry), {"HOME": str(tmp_path)})
    assert f"llamacpp.{field}" in str(err.value) and exit_code_for(err.value) == 2


@pytest.mark.parametrize("name", ["x-00002-of-00001.gguf", "x-00001-of-00000.gguf", "x-00000-of-00003.gguf"])
def test_impossible_split_names_are_refused(served: HubServer, tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="not a valid split-file name") as err:
        acquire.ensure(hub_settings(tmp_path, served, hf_filename=name), FAST)
    assert "llamacpp.hf_filename" in err.value.message and served.requests == []


# ---- 12: crafted GGUF headers --------------------------------------------------------------------------


def _gguf(n_tensors: int, n_kv: int, body: bytes) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + body


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


_NESTED = _key("deep") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 10_000 + struct.pack("<IQ", 4, 0)
CRAFTED = {
    "huge-kv-count": _gguf(0, 2**63, b""),
    "huge-tensor-count": _gguf(2**64 - 1, 0, b""),
    "huge-string": _gguf(0, 1, struct.pack("<Q", 2**63) + b"x" * 64),
    "huge-array": _gguf(0, 1, _key("a") + struct.pack("<IIQ", 9, 8, 2**62)),
    "huge-scalar-array": _gguf(0, 1, _key("a") + struct.pack("<IIQ", 9, 12, 2**61)),
    "deep-arrays": _gguf(0, 1, _NESTED),
    "many-dims": _gguf(1, 0, _key("t") + struct.pack("<I", 2**31) + b"\0" * 64),
    "huge-dims": _gguf(1, 0, _key("t") + struct.pack("<IQQQQIQ", 4, 2**64 - 1, 2**64 - 1, 2**64 - 1, 2**64 - 1, 0, 0)),
    "bad-type": _gguf(0, 1, _key("a") + struct.pack("<I", 77)),
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_header_is_one_line_verification_failure(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(CRAFTED[name] + b"\0" * 4096)
    for read in (gguf_header.check, gguf_meta.read_local):
        started = time.monotonic()
        with pytest.raises(ModelVerificationFailed) as err:
            read(path)
        assert "\n" not in err.value.message and time.monotonic() - started < 2


def test_crafted_metadata_values_are_refused(tmp_path: Path) -> None:
    # block_count as a string and as a float infinity used to give ValueError / OverflowError tracebacks.
    def kv(key: str, vtype: int, payload: bytes) -> bytes:
        return _key(key) + struct.pack("<I", vtype) + payload

    arch = kv("general.architecture", 8, _key("llama"))
    inf = struct.pack("<f", float("inf"))
    for block_count in (kv("llama.block_count", 8, _key("many")), kv("llama.block_count", 6, inf),
                        kv("llama.block_count", 10, struct.pack("<Q", 2**62))):
        body = arch + block_count + kv("llama.embedding_length", 4, struct.pack("<I", 8)) + \
            kv("llama.attention.head_count", 4, struct.pack("<I", 2))
        path = tmp_path / "m.gguf"
        path.write_bytes(_gguf(0, 4, body))
        with pytest.raises(ModelVerificationFailed, match=r"m\.gguf"):
            gguf_meta.read_local(path)


def _cli(tmp_path: Path, llamacpp: dict[str, object], **env: str) -> subprocess.CompletedProcess[str]:
    registry = write_registry(tmp_path / "cli.yaml", {"tiny": {"llamacpp": llamacpp}})
    environ = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "LLM_PROFILE_NAME": "tiny",
               "LLM_PROFILES_CONFIG_PATH": str(registry), "WRAPPER_STATE_DIR": str(tmp_path / "state"), **env}
    return subprocess.run([WRAPPER, "fetch"], check=False, env=environ, capture_output=True, text=True, timeout=30)


def _one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    return errors[0]


def test_crafted_header_through_the_cli_is_exit_3(tmp_path: Path) -> None:
    path = tmp_path / "deep.gguf"
    path.write_bytes(CRAFTED["deep-arrays"])
    done = _cli(tmp_path, {"model_path": str(path)})
    assert done.returncode == 3 and "nested" in _one_error_line(done)


# ---- 13: model_path that is not a file ------------------------------------------------------------------


def _fifo(tmp_path: Path) -> str:
    os.mkfifo(tmp_path / "fifo.gguf")
    return str(tmp_path / "fifo.gguf")


def _loop(tmp_path: Path) -> str:
    (tmp_path / "a.gguf").symlink_to(tmp_path / "b.gguf")
    (tmp_path / "b.gguf").symlink_to(tmp_path / "a.gguf")
    return str(tmp_path / "a.gguf")


@pytest.mark.parametrize(("case", "make", "words"), [
    ("fifo", _fifo, "FIFO"),
    ("not-a-dir-parent", lambda t: "/etc/passwd/x.gguf", "not a directory"),
    ("symlink-loop", _loop, "symlink loop"),
    ("too-long", lambda t: str(t / ("x" * 300 + ".gguf")), "too long"),
    ("directory", str, "a directory"),
])
def test_model_path_that_is_not_a_file_is_one_line(
    tmp_path: Path, case: str, make: Callable[[Path], str], words: str
) -> None:
    done = _cli(tmp_path, {"model_path": make(tmp_path)})  # a FIFO used to hang here for ever (timeout=30)
    assert done.returncode in (2, 3) and words in _one_error_line(done)


def test_permission_denied_model_path_is_one_line(tiny_dense: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the CLI without its file-permission override")
    # Root, but without the capabilities that let it ignore file modes: the model's folder (mode 000) is
    # closed to it while the checkout stays readable wherever it lies (as another user, a checkout under a
    # 0700 folder such as `mktemp -d` left the wrapper itself unreadable).
    private = tmp_path / "private"
    private.mkdir()
    (private / "m.gguf").write_bytes(tiny_dense.read_bytes())
    private.chmod(0o000)
    registry = write_registry(tmp_path / "cli.yaml", {"tiny": {"llamacpp": {"model_path": str(private / "m.gguf")}}})
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "LLM_PROFILE_NAME": "tiny",
           "LLM_PROFILES_CONFIG_PATH": str(registry), "WRAPPER_STATE_DIR": str(tmp_path / "state")}
    try:
        done = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", WRAPPER, "fetch"],
                              check=False, env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    finally:
        private.chmod(0o700)
    assert done.returncode == 3 and "permission denied" in _one_error_line(done)


# ---- 4: a token with whitespace is refused before any request -------------------------------------------


@pytest.mark.parametrize("how", ["file-two-lines", "env-space"])
def test_token_with_whitespace_is_refused_before_any_request(served: HubServer, tmp_path: Path, how: str) -> None:
    secret = "hf_secretSECRETsecret123"
    if how == "file-two-lines":
        (tmp_path / "token").write_text(f"{secret}\n{secret}\n")
        env = hub_environ(tmp_path, served, HF_TOKEN_FILE=str(tmp_path / "token"))
    else:
        env = hub_environ(tmp_path, served, HF_TOKEN=f"{secret} extra")
    with pytest.raises(ConfigError, match="whitespace") as err:
        acquire.ensure(hub_settings(tmp_path, served, env), FAST)
    assert secret not in err.value.message + err.value.hint and served.requests == []
