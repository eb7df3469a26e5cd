"""Model acquisition against the fake Hub: every fault ends in a verified file or a clear exit-3 error."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import pytest

from tests.acquire_fixtures import FAST, FILE, REPO_ID, hub_environ, hub_settings, write_split
from tests.hubserver import HubServer
from wrapper.errors import ModelUnavailable, ModelVerificationFailed, exit_code_for
from wrapper.model import acquire

TOKEN = "hf_secretSECRETsecretSECRET123"


@pytest.fixture
def model(tiny_dense: Path) -> bytes:
    return tiny_dense.read_bytes()


@pytest.fixture
def served(hub: HubServer, model: bytes) -> HubServer:
    hub.add_file(REPO_ID, FILE, model)
    hub.add_file(REPO_ID, "other-q8_0.gguf", model)
    hub.add_file(REPO_ID, "README.md", b"# tiny\n", lfs=False)
    return hub


def _no_partials(root: Path) -> None:
    assert not [p.name for p in root.iterdir() if p.name.endswith(".part")]


def test_download_verifies_and_records_marker_then_restart_skips_hashing(
    served: HubServer, model: bytes, tmp_path: Path
) -> None:
    s = hub_settings(tmp_path, served)
    got = acquire.ensure(s, FAST)
    target = tmp_path / "models" / FILE
    assert got.path == target and got.source == "downloaded"
    assert target.read_bytes() == model
    assert got.sha256 == hashlib.sha256(model).hexdigest() and got.size == len(model)
    assert acquire.marker_path(target).is_file()
    assert not any(auth for _, _, _, auth in served.requests)  # no token configured: none sent
    _no_partials(target.parent)

    bodies = len(served.body_requests())
    again = acquire.ensure(s, FAST)
    assert again.source == "verified-cache" and again.sha256 == got.sha256
    assert len(served.body_requests()) == bodies and len(served.requests) == bodies + 1  # the first HEAD only


def test_touched_file_is_rehashed_not_trusted(served: HubServer, tmp_path: Path) -> None:
    s = hub_settings(tmp_path, served)
    target = acquire.ensure(s, FAST).path
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert acquire.ensure(s, FAST).source == "local"
    assert acquire.ensure(s, FAST).source == "verified-cache"


def test_dropped_connection_resumes_with_range(served: HubServer, model: bytes, tmp_path: Path) -> None:
    served.faults.drop_at, served.faults.times = 200_000, 1
    got = acquire.ensure(hub_settings(tmp_path, served), FAST)
    assert got.path.read_bytes() == model
    ranges = [r for _, _, r, _ in served.body_requests() if r]
    assert ranges and ranges[0].startswith("bytes=") and int(ranges[0][6:-1]) >= 190_000


def test_server_ignoring_range_restarts_from_zero(served: HubServer, model: bytes, tmp_path: Path) -> None:
    served.faults.drop_at, served.faults.times, served.faults.ignore_range = 200_000, 1, True
    got = acquire.ensure(hub_settings(tmp_path, served), FAST)
    assert got.path.read_bytes() == model and got.source == "downloaded"


def test_stalled_transfer_is_retried_not_waited_on(served: HubServer, model: bytes, tmp_path: Path) -> None:
    served.faults.stall_at, served.faults.stall_s, served.faults.times = 100_000, 60, 1
    started = time.monotonic()
    got = acquire.ensure(hub_settings(tmp_path, served), FAST)
    assert got.path.read_bytes() == model
    assert time.monotonic() - started < 15  # stall_s=1 in FAST: far less than the 60 s stall


def test_flipped_byte_once_is_moved_aside_and_downloaded_again(
    served: HubServer, model: bytes, tmp_path: Path
) -> None:
    served.faults.flip_at, served.faults.times = 4321, 1
    got = acquire.ensure(hub_settings(tmp_path, served), FAST)
    assert got.path.read_bytes() == model
    bad = list((tmp_path / "models").glob(f"{FILE}.bad-*"))
    assert len(bad) == 1 and bad[0].read_bytes() != model


def test_flipped_byte_every_time_fails_exit_3_naming_both_hashes(
    served: HubServer, model: bytes, tmp_path: Path
) -> None:
    served.faults.flip_at = 4321
    with pytest.raises(ModelVerificationFailed) as err:
        acquire.ensure(hub_settings(tmp_path, served), FAST)
    assert exit_code_for(err.value) == 3
    assert hashlib.sha256(model).hexdigest() in err.value.message and "sha256 is" in err.value.message
    assert not (tmp_path / "models" / FILE).exists()  # never renamed into place
    assert len(list((tmp_path / "models").glob(f"{FILE}.bad-*"))) == 2


@pytest.mark.parametrize("delta", [-1000, 1000])
def test_wrong_size_fails_exit_3(served: HubServer, tmp_path: Path, delta: int) -> None:
    served.faults.size_delta = delta
    # -1000: the Hub lies consistently (size matches, hash does not); +1000: the body is short.
    with pytest.raises(ModelVerificationFailed, match="sha256 is" if delta < 0 else "size is"):
        acquire.ensure(hub_settings(tmp_path, served), FAST)
    assert not (tmp_path / "models" / FILE).exists()


def test_gated_repo_without_token_says_set_hf_token(served: HubServer, tmp_path: Path) -> None:
    served.gate(REPO_ID, TOKEN)
    with pytest.raises(ModelUnavailable) as err:
        acquire.ensure(hub_settings(tmp_path, served), FAST)
    assert exit_code_for(err.value) == 3
    assert "gated" in err.value.message and "no token was given" in err.value.message
    assert "HF_TOKEN" in err.value.hint


def test_wrong_token_is_refused_and_never_shown(served: HubServer, tmp_path: Path) -> None:
    served.gate(REPO_ID, "hf_the_right_one_000000000")
    env = hub_environ(tmp_path, served, HF_TOKEN=TOKEN)
    with pytest.raises(ModelUnavailable) as err:
        acquire.ensure(hub_settings(tmp_path, served, env), FAST)
    assert "HTTP 403" in err.value.message and "refused" in err.value.message
    assert TOKEN not in err.value.message + err.value.hint


def test_token_file_opens_gated_repo_and_stays_out_of_logs(
    served: HubServer, model: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    served.gate(REPO_ID, TOKEN)
    (tmp_path / "token").write_text(TOKEN + "\n")
    env = hub_environ(tmp_path, served, HF_TOKEN_FILE=str(tmp_path / "token"))
    with caplog.at_level(logging.DEBUG):
        got = acquire.ensure(hub_settings(tmp_path, served, env), FAST)
    assert got.path.read_bytes() == model
    assert TOKEN not in caplog.text
    # The token went to the Hub, not to the CDN origin the file redirects to.
    assert any(auth for m, path, _, auth in served.requests if "/resolve/" in path)
    assert not any(auth for m, path, _, auth in served.requests if path.startswith("/_lfs/"))


def test_injected_401_everywhere(served: HubServer, tmp_path: Path) -> None:
    served.faults.status = 401
    with pytest.raises(ModelUnavailable, match="access denied"):
        acquire.ensure(hub_settings(tmp_path, served), FAST)


def test_missing_file_names_repo_file_revision_and_lists_ggufs(served: HubServer, tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable) as err:
        acquire.ensure(hub_settings(tmp_path, served, hf_filename="tiny-Q4_K_M.gguf"), FAST)
    msg = err.value.message
    assert REPO_ID in msg and "'tiny-Q4_K_M.gguf'" in msg and "'main'" in msg
    assert err.value.hint == f"the repo has: other-q8_0.gguf, {FILE}"


def test_missing_revision(served: HubServer, tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="revision 'v9' not found"):
        acquire.ensure(hub_settings(tmp_path, served, hf_revision="v9"), FAST)


def test_unknown_repo(served: HubServer, tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="org/nope"):
        acquire.ensure(hub_settings(tmp_path, served, hf_repo_id="org/nope"), FAST)


def test_unreachable_hub_is_exit_3(tmp_path: Path, served: HubServer) -> None:
    env = hub_environ(tmp_path, served, HF_ENDPOINT="http://127.0.0.1:9")
    with pytest.raises(ModelUnavailable, match="cannot reach the Hub"):
        acquire.ensure(hub_settings(tmp_path, served, env), FAST)


def test_truncated_local_copy_is_refused_before_launch(model: bytes, tmp_path: Path, served: HubServer) -> None:
    local = tmp_path / "copy.gguf"
    local.write_bytes(model[: len(model) - 4096])
    with pytest.raises(ModelVerificationFailed, match="truncated") as err:
        acquire.ensure(hub_settings(tmp_path, served, model_path=str(local)), FAST)
    assert exit_code_for(err.value) == 3


def test_truncated_file_in_model_root_is_replaced_from_the_hub(
    served: HubServer, model: bytes, tmp_path: Path
) -> None:
    target = tmp_path / "models" / FILE
    target.parent.mkdir()
    target.write_bytes(model[:300_000])
    got = acquire.ensure(hub_settings(tmp_path, served), FAST)
    assert got.path.read_bytes() == model and got.source == "downloaded"


def test_hand_copied_file_matching_the_hub_is_used_without_download(
    served: HubServer, model: bytes, tmp_path: Path
) -> None:
    target = tmp_path / "models" / FILE
    target.parent.mkdir()
    target.write_bytes(model)
    assert acquire.ensure(hub_settings(tmp_path, served), FAST).source == "local"
    assert served.body_requests() == []


def test_pinned_sha256_mismatch_on_local_file(model: bytes, tmp_path: Path, served: HubServer) -> None:
    local = tmp_path / "copy.gguf"
    local.write_bytes(model)
    with pytest.raises(ModelVerificationFailed, match="expected 0000"):
        acquire.ensure(hub_settings(tmp_path, served, model_path=str(local), sha256="0" * 64), FAST)


def test_pinned_sha256_wins_over_hub_metadata(served: HubServer, tmp_path: Path) -> None:
    with pytest.raises(ModelVerificationFailed, match="expected " + "a" * 64):
        acquire.ensure(hub_settings(tmp_path, served, sha256="a" * 64), FAST)


def test_offline_with_file_uses_it_without_network(model: bytes, tmp_path: Path, served: HubServer) -> None:
    target = tmp_path / "models" / FILE
    target.parent.mkdir()
    target.write_bytes(model)
    env = hub_environ(tmp_path, served, HF_HUB_OFFLINE="1")
    assert acquire.ensure(hub_settings(tmp_path, served, env), FAST).path == target
    assert served.requests == []


def test_offline_without_file_is_exit_3(tmp_path: Path, served: HubServer) -> None:
    env = hub_environ(tmp_path, served, HF_HUB_OFFLINE="1")
    with pytest.raises(ModelUnavailable, match="HF_HUB_OFFLINE=1") as err:
        acquire.ensure(hub_settings(tmp_path, served, env), FAST)
    assert exit_code_for(err.value) == 3 and served.requests == []


def test_not_enough_disk_fails_before_downloading(
    served: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the pure decision is faked here; the real full-disk write is in test_acquire_procs.py.
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10 * 2**20))
    with pytest.raises(ModelUnavailable, match="not enough disk space"):
        acquire.ensure(hub_settings(tmp_path, served), FAST)
    assert served.body_requests() == []


def test_split_gguf_fetches_and_verifies_every_shard(hub: HubServer, tmp_path: Path) -> None:
    shards = write_split(tmp_path / "src", "big")
    assert len(shards) == 3
    for p in shards:
        hub.add_file(REPO_ID, p.name, p)
    hub.faults.flip_at, hub.faults.times = 500, 1  # the first shard arrives damaged once
    got = acquire.ensure(hub_settings(tmp_path, hub, hf_filename="big-00002-of-00003.gguf"), FAST)
    assert got.path.name == "big-00001-of-00003.gguf"
    assert [p.name for p in got.shards] == [p.name for p in shards]
    for src, dst in zip(shards, got.shards, strict=True):
        assert dst.read_bytes() == src.read_bytes()
    assert got.size == sum(p.stat().st_size for p in shards)


def test_split_gguf_with_a_missing_shard_on_the_hub(hub: HubServer, tmp_path: Path) -> None:
    shards = write_split(tmp_path / "src", "big")
    for p in shards[:2]:
        hub.add_file(REPO_ID, p.name, p)
    with pytest.raises(ModelUnavailable, match=r"big-00003-of-00003\.gguf"):
        acquire.ensure(hub_settings(tmp_path, hub, hf_filename="big-00001-of-00003.gguf"), FAST)


def test_progress_logs_percent_rate_eta_off_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    import io

    from wrapper.model.transfer import Progress

    p = Progress("m.gguf", 100 * 2**20, every_s=0.0, stream=io.StringIO())
    p.begin(0)
    with caplog.at_level(logging.INFO, logger="wrapper.acquire"):
        p.update(25 * 2**20)
        p.update(100 * 2**20, final=True)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "25.0%" in lines[0] and "MB/s" in lines[0] and "ETA" in lines[0]
    assert "100.0%" in lines[1]


def test_progress_draws_a_bar_on_a_terminal() -> None:
    import io

    from wrapper.model.transfer import Progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    p = Progress("m.gguf", 1000, every_s=5.0, stream=stream)
    p.update(500, final=True)
    assert stream.getvalue().startswith("\r[############............] m.gguf:  50.0%")


def test_revision_pinned_to_a_commit(served: HubServer, model: bytes, tmp_path: Path) -> None:
    from tests.hubserver import commit_of

    commit = commit_of(REPO_ID, "main")
    got = acquire.ensure(hub_settings(tmp_path, served, hf_revision=commit), FAST)
    assert got.path.read_bytes() == model
    assert any(f"/resolve/{commit}/" in path for _, path, _, _ in served.requests)
    assert f'"commit": "{commit}"' in acquire.marker_path(got.path).read_text()


def test_split_files_in_a_repo_subfolder(hub: HubServer, tmp_path: Path) -> None:
    shards = write_split(tmp_path / "src", "big-Q4_K_M")
    for p in shards:
        hub.add_file(REPO_ID, f"Q4_K_M/{p.name}", p)
    s = hub_settings(tmp_path, hub, hf_filename=shards[0].name, hf_subfolder="Q4_K_M")
    got = acquire.ensure(s, FAST)
    root = tmp_path / "models"
    assert got.path == root / shards[0].name
    assert [p.name for p in got.shards] == [p.name for p in shards]
    assert all((root / p.name).read_bytes() == p.read_bytes() for p in shards)


def test_home_in_model_path_is_expanded(hub: HubServer, tmp_path: Path, model: bytes,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x.gguf").write_bytes(model)
    s = hub_settings(tmp_path, hub, environ={"HOME": str(tmp_path)}, model_path="~/m/x.gguf")
    assert acquire.expected_path(s) == tmp_path / "m" / "x.gguf"
    assert acquire.ensure(s, FAST).path == tmp_path / "m" / "x.gguf"
