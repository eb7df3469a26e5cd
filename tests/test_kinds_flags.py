"""Every kind of profile on the command line: exact argv for alias, projector, draft model, embedding and rerank,
against the recorded `--help` of the built binary (tests/data/llama-server-help-new.txt) and an old one."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import pytest

from tests.acquire_fixtures import FAST, FILE, REPO_ID, hub_environ, write_registry
from tests.hubserver import HubServer
from wrapper import profiles, settings
from wrapper.errors import BinaryError, ModelVerificationFailed, exit_code_for
from wrapper.launch import flags, prepare
from wrapper.model import acquire

DATA = Path(__file__).parent / "data"
NEW = flags.Capabilities.from_help("/bin/llama-server", (DATA / "llama-server-help-new.txt").read_text(), "b-new")
OLD = flags.Capabilities.from_help("/bin/llama-server", (DATA / "llama-server-help-old.txt").read_text(), "b-old")
MODEL = Path("/m/a.gguf")
BASE = ["/bin/llama-server", "--model", "/m/a.gguf", "--host", "127.0.0.1", "--port", "8080"]


def make(profile: dict[str, Any] | None = None, llamacpp: dict[str, Any] | None = None,
         **env: str) -> settings.Settings:
    body: dict[str, Any] = {"model_path": str(MODEL), "host": "127.0.0.1", "port": 8080, **(llamacpp or {})}
    p = profiles.Profile.model_validate({"llamacpp": body, **(profile or {})})
    reg = profiles.Registry(path=Path("r.yaml"), profiles={"p": p})
    return settings.build("p", environ={"WRAPPER_STATUS_PORT": "0", **env}, registry=reg)


def argv(s: settings.Settings, caps: flags.Capabilities = NEW) -> list[str]:
    return flags.derive(s, caps, MODEL).argv


def test_removed_flags_are_not_counted_as_accepted() -> None:
    # This build lists `--draft-max` only to say it is gone; passing it makes llama-server refuse to start.
    assert "--draft-max" not in NEW.flags and "--draft-min" not in NEW.flags
    assert NEW.spelling("draft_n_max") == "--spec-draft-n-max"
    old_style = "--draft-max N   number of tokens to draft\n-md, --model-draft FNAME   draft model\n"
    caps = flags.Capabilities.from_help("/x", old_style)
    assert caps.spelling("draft_n_max") == "--draft-max" and caps.spelling("model_draft") == "--model-draft"
    s = make(llamacpp={"draft": {"path": "/m/d.gguf", "n_max": 3}})
    old_argv = flags.derive(s, dataclasses.replace(caps, flags=caps.flags | NEW.flags - {"--spec-type",
                                                    "--spec-draft-model", "--spec-draft-n-max"}), MODEL).argv
    assert old_argv[len(BASE):] == ["--model-draft", "/m/d.gguf", "--draft-max", "3"]  # no --spec-type there


@pytest.mark.parametrize(
    ("profile", "llamacpp", "tail"),
    [
        ({"model_id": "qwen3-8b"}, {}, ["--alias", "qwen3-8b"]),
        ({"task_type": "embedding"}, {}, ["--embeddings"]),
        ({"task_type": "embedding"}, {"pooling": "cls"}, ["--embeddings", "--pooling", "cls"]),
        ({"task_type": "embedding"}, {"embeddings": True}, ["--embeddings"]),  # never twice
        ({"task_type": "rerank"}, {}, ["--reranking"]),
        ({"supports_vision": True}, {"mmproj": "/m/a-mmproj.gguf"}, ["--mmproj", "/m/a-mmproj.gguf"]),
        ({}, {"draft": {"path": "/m/d.gguf"}}, ["--spec-draft-model", "/m/d.gguf", "--spec-type", "draft-simple"]),
        ({}, {"draft": {"path": "/m/d.gguf", "n_max": 8, "n_min": 2, "p_min": 0.5, "n_gpu_layers": "all"}},
         ["--spec-draft-model", "/m/d.gguf", "--spec-type", "draft-simple", "--spec-draft-n-max", "8",
          "--spec-draft-n-min", "2", "--spec-draft-p-min", "0.5", "--spec-draft-ngl", "999"]),
        # A Hub projector lands in model_root like the model (the model's repo when none is named).
        ({"supports_vision": True}, {"model_path": None, "hf_repo_id": "o/r", "hf_filename": "a.gguf",
                                     "model_root": "/models", "mmproj": {"hf_filename": "mm.gguf"}},
         ["--mmproj", "/models/mm.gguf"]),
    ],
)
def test_exact_argv_per_kind(profile: dict[str, Any], llamacpp: dict[str, Any], tail: list[str]) -> None:
    assert argv(make(profile, llamacpp)) == BASE + tail


def test_metrics_turned_on_when_the_status_port_reserves_them() -> None:
    assert argv(make(WRAPPER_STATUS_PORT="8201"))[-1] == "--metrics"
    assert "--metrics" not in argv(make())  # no status port: nobody would read them
    twice = argv(make(llamacpp={"extra_args": ["--metrics"]}, WRAPPER_STATUS_PORT="8201"))
    assert twice.count("--metrics") == 1


def test_draft_ctx_size_on_a_build_without_it_names_the_setting() -> None:
    with pytest.raises(BinaryError) as err:
        argv(make(llamacpp={"draft": {"path": "/m/d.gguf", "ctx_size": 1024}}))
    assert "llamacpp.draft.ctx_size=1024" in err.value.message


@pytest.mark.parametrize(
    ("profile", "llamacpp", "setting"),
    [
        ({"supports_vision": True}, {"mmproj": "/m/p.gguf"}, "llamacpp.mmproj"),
        ({}, {"draft": {"path": "/m/d.gguf"}}, "llamacpp.draft"),
        ({"task_type": "rerank"}, {}, "task_type: rerank"),
        ({"model_id": "x"}, {}, "model_id=x"),
    ],
)
def test_old_binary_refuses_kind_flags_with_the_setting(profile: dict[str, Any], llamacpp: dict[str, Any],
                                                         setting: str) -> None:
    with pytest.raises(BinaryError) as err:
        argv(make(profile, llamacpp), OLD)
    assert setting in err.value.message and exit_code_for(err.value) == 2


@pytest.mark.parametrize(
    ("profile", "llamacpp", "words"),
    [
        ({}, {"mmproj": "/m/p.gguf"}, "supports_vision: true"),
        ({"task_type": "embedding"}, {"draft": {"path": "/m/d.gguf"}}, "generates nothing"),
        ({"supports_vision": True}, {"mmproj": {"hf_repo_id": "o/r"}}, "no file"),
        ({"supports_vision": True}, {"mmproj": {"path": "/a", "hf_filename": "b.gguf"}}, "not both"),
        ({}, {"pooling": "max"}, "pooling"),
    ],
)
def test_kind_fields_are_validated(profile: dict[str, Any], llamacpp: dict[str, Any], words: str) -> None:
    with pytest.raises(Exception) as err:
        make(profile, llamacpp)
    assert words in str(err.value)


def test_hub_projector_is_downloaded_and_verified_like_the_model(
    hub: HubServer, tiny_dense: Path, tmp_path: Path
) -> None:
    """A flipped byte in the projector is moved aside and fetched again, exactly as for the model."""
    projector = b"GGUF" + tiny_dense.read_bytes()[4:]
    hub.add_file(REPO_ID, FILE, tiny_dense.read_bytes())
    hub.add_file("other/vision", "mm.gguf", projector)
    body = {"hf_repo_id": REPO_ID, "hf_filename": FILE, "model_root": str(tmp_path / "models"),
            "mmproj": {"hf_repo_id": "other/vision", "hf_filename": "mm.gguf"}}
    registry = write_registry(tmp_path / "profiles.yaml", {"v": {"supports_vision": True, "llamacpp": body}})
    s = settings.build("v", str(registry), hub_environ(tmp_path, hub))
    hub.faults.flip_at, hub.faults.times = 1000, 1
    [found] = prepare.fetch_companions(s)
    assert found.setting == "llamacpp.mmproj" and found.file.source == "downloaded"
    assert found.file.path == tmp_path / "models" / "mm.gguf"
    assert found.file.sha256 == hashlib.sha256(projector).hexdigest()
    assert len(list((tmp_path / "models").glob("mm.gguf.bad-*"))) == 1
    # And the second start takes the verified-cache path without the Hub's bytes again.
    again = acquire.ensure(acquire.companion(s, s.server.mmproj), FAST)  # type: ignore[arg-type]
    assert again.source == "verified-cache"


def test_pinned_draft_sha256_mismatch_is_exit_3(tiny_dense: Path, tmp_path: Path) -> None:
    draft = tmp_path / "draft.gguf"
    draft.write_bytes(tiny_dense.read_bytes())
    s = make(llamacpp={"model_path": str(tiny_dense), "draft": {"path": str(draft), "sha256": "0" * 64}},
             WRAPPER_STATE_DIR=str(tmp_path / "state"))
    with pytest.raises(ModelVerificationFailed) as err:
        prepare.fetch_companions(s)
    assert str(draft) in err.value.message and exit_code_for(err.value) == 3


@pytest.mark.parametrize(
    ("name", "flags_wanted"),
    [
        ("tiny-embed", ["--embeddings", "--pooling", "--alias"]),
        ("tiny-rerank", ["--reranking", "--alias"]),
        ("tiny-vision", ["--mmproj"]),
        ("tiny-draft", ["--spec-draft-model", "--spec-type", "--spec-draft-n-max"]),
        ("nomic-embed-cpu", ["--embeddings"]),
        ("qwen2.5-vl-3b-vision-4090", ["--mmproj"]),
        ("qwen2.5-7b-spec-4090", ["--spec-draft-model", "--spec-draft-n-max", "--spec-draft-n-min",
                                  "--spec-draft-ngl"]),
        ("bge-reranker-v2-m3-cpu", ["--reranking"]),
    ],
)
def test_shipped_profile_of_each_kind_derives_its_flags(name: str, flags_wanted: list[str]) -> None:
    registry = profiles.load(Path(__file__).resolve().parent.parent / "config" / "llm_profiles.yaml")
    s = settings.build(name, environ={"WRAPPER_STATUS_PORT": "0"}, registry=registry)
    got = flags.derive(s, NEW, MODEL).argv
    assert set(flags_wanted) <= set(got), got
    if s.server.mmproj is not None:  # the projector goes where acquire puts it: beside the model
        assert Path(got[got.index("--mmproj") + 1]).parent == acquire.expected_path(s).parent


def test_fetch_command_fetches_the_projector_too(tiny_dense: Path, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    projector = tmp_path / "mm.gguf"
    projector.write_bytes(tiny_dense.read_bytes())
    body = {"model_path": str(tiny_dense), "mmproj": str(projector)}
    registry = write_registry(tmp_path / "p.yaml", {"v": {"supports_vision": True, "llamacpp": body}})
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WRAPPER_STATE_DIR": str(tmp_path / "s")}
    proc = subprocess.run([sys.executable, "-m", "wrapper", "fetch", "--config", str(registry), "--profile", "v",
                           "--json"], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    [companion] = json.loads(proc.stdout)["companions"]
    assert companion["setting"] == "llamacpp.mmproj" and companion["path"] == str(projector)
    assert companion["sha256"] == hashlib.sha256(projector.read_bytes()).hexdigest()
