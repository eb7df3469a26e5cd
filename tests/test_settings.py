"""Settings: registry + env -> one frozen object where every value knows its origin."""

from __future__ import annotations

from pathlib import Path

import pytest

from wrapper import profiles, settings
from wrapper.errors import ConfigError

REG = """\
profiles:
  p:
    gpu: {device_ids: [1]}
    llamacpp:
      model_path: /m/a.gguf
      ctx_size: 4096
      parallel: 2
"""


@pytest.fixture
def registry(tmp_path: Path) -> profiles.Registry:
    path = tmp_path / "r.yaml"
    path.write_text(REG)
    return profiles.load(path)


def build(registry: profiles.Registry, **env: str) -> settings.Settings:
    return settings.build("p", environ=env, registry=registry)


def test_origins_profile_and_default(registry: profiles.Registry) -> None:
    s = build(registry)
    assert s.server.ctx_size == 4096 and s.origin("llamacpp.ctx_size") == "profile"
    assert s.server.threads is None and s.origin("llamacpp.threads") == "default"
    assert s.cuda_visible_devices == "1" and s.cuda_origin == "profile"


@pytest.mark.parametrize(
    ("var", "value", "path", "expected"),
    [
        ("LLAMACPP_CTX_SIZE_OVERRIDE", "8192", "ctx_size", 8192),
        ("LLAMACPP_N_GPU_LAYERS_OVERRIDE", "20", "n_gpu_layers", 20),
        ("LLAMACPP_N_GPU_LAYERS_OVERRIDE", "all", "n_gpu_layers", "all"),
        ("LLAMACPP_THREADS_OVERRIDE", "6", "threads", 6),
        ("LLAMACPP_PARALLEL_OVERRIDE", "8", "parallel", 8),
        ("LLAMACPP_BATCH_SIZE_OVERRIDE", "1024", "batch_size", 1024),
        ("LLAMACPP_UBATCH_SIZE_OVERRIDE", "256", "ubatch_size", 256),
        ("LLAMACPP_PORT_OVERRIDE", "9000", "port", 9000),
        ("LLAMACPP_HOST_OVERRIDE", "127.0.0.1", "host", "127.0.0.1"),
        ("LLAMACPP_FLASH_ATTN_OVERRIDE", "off", "flash_attn", "off"),
        ("LLAMACPP_CACHE_TYPE_K_OVERRIDE", "q8_0", "cache_type_k", "q8_0"),
        ("LLAMACPP_MLOCK_OVERRIDE", "true", "mlock", True),
    ],
)
def test_env_override_wins_and_is_recorded(
    registry: profiles.Registry, var: str, value: str, path: str, expected: object
) -> None:
    s = build(registry, **{var: value})
    assert getattr(s.server, path) == expected
    assert s.origin(f"llamacpp.{path}") == f"env:{var}"


def test_blank_override_means_unset(registry: profiles.Registry) -> None:
    s = build(registry, LLAMACPP_CTX_SIZE_OVERRIDE="  ", CUDA_VISIBLE_DEVICES_OVERRIDE="")
    assert s.server.ctx_size == 4096 and s.origin("llamacpp.ctx_size") == "profile"
    assert s.cuda_visible_devices == "1"


@pytest.mark.parametrize(
    ("var", "value", "expected"),
    [
        ("LLAMACPP_CTX_SIZE_OVERRIDE", "big", "LLAMACPP_CTX_SIZE_OVERRIDE='big': Input should be a valid integer"),
        ("LLAMACPP_THREADS_OVERRIDE", "1.5", "LLAMACPP_THREADS_OVERRIDE='1.5'"),
        ("LLAMACPP_PORT_OVERRIDE", "0", "LLAMACPP_PORT_OVERRIDE='0': Input should be greater than or equal to 1"),
        ("LLAMACPP_PARALLEL_OVERRIDE", "-2", "(overrides llamacpp.parallel)"),
        ("WRAPPER_STATUS_PORT", "http", "WRAPPER_STATUS_PORT='http': not an integer"),
        ("WRAPPER_SELFCHECK_ENABLED", "perhaps", "WRAPPER_SELFCHECK_ENABLED='perhaps'"),
    ],
)
def test_malformed_override_names_the_variable(
    registry: profiles.Registry, var: str, value: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        build(registry, **{var: value})
    assert expected in str(info.value)


def test_cuda_override(registry: profiles.Registry) -> None:
    s = build(registry, CUDA_VISIBLE_DEVICES_OVERRIDE="0,2")
    assert s.cuda_visible_devices == "0,2" and s.cuda_origin == "env:CUDA_VISIBLE_DEVICES_OVERRIDE"


def test_cache_dir_sets_model_root_unless_profile_does(registry: profiles.Registry) -> None:
    s = build(registry, LLM_CACHE_DIR="/cache")
    assert s.server.model_root == "/cache/gguf" and s.origin("llamacpp.model_root") == "env:LLM_CACHE_DIR"


def test_layers_never_beat_env(registry: profiles.Registry) -> None:
    s = build(registry, LLAMACPP_PARALLEL_OVERRIDE="3")
    tuned, skipped = s.with_layer({"llamacpp.parallel": 8, "llamacpp.batch_size": 256}, "tuning:run-1")
    assert tuned.server.parallel == 3 and skipped == ["llamacpp.parallel"]
    assert tuned.server.batch_size == 256 and tuned.origin("llamacpp.batch_size") == "tuning:run-1"
    assert s.server.batch_size is None  # frozen: the original is untouched


def test_secret_never_prints(registry: profiles.Registry) -> None:
    s = build(registry, HF_TOKEN="hf_abcdefghijklmnopqrstuvwxyz")
    assert "hf_abc" not in repr(s) and "hf_abc" not in str(s.env)
    assert s.env.hf_token is not None and s.env.hf_token.reveal().startswith("hf_abc")
    assert "HF_TOKEN" not in s.env.child_env()


def test_profile_from_env_and_cli(registry: profiles.Registry) -> None:
    assert settings.build(None, environ={"LLM_PROFILE_NAME": "p"}, registry=registry).profile_name == "p"
    with pytest.raises(ConfigError, match="no profile selected"):
        settings.build(None, environ={}, registry=registry)


def test_every_block_knows_default_from_profile(registry: profiles.Registry) -> None:
    s = build(registry)
    assert s.origin("gpu.device_ids") == "profile" and s.origin("gpu.num_gpus") == "default"
    assert s.origin("display_name") == "default" and s.origin("backend") == "default"


def test_env_override_goes_through_the_schema_validators(registry: profiles.Registry) -> None:
    s = build(registry, LLAMACPP_N_GPU_LAYERS_OVERRIDE="-1", LLAMACPP_CACHE_TYPE_V_OVERRIDE="Q4_0")
    assert s.server.n_gpu_layers == "all" and s.server.cache_type_v == "q4_0"
    with pytest.raises(ConfigError) as info:
        build(registry, LLAMACPP_N_GPU_LAYERS_OVERRIDE="-7")
    assert str(info.value).splitlines()[1] == (
        "  - LLAMACPP_N_GPU_LAYERS_OVERRIDE='-7': Input should be greater than or equal to 0 or 'auto' or 'all' "
        "(overrides llamacpp.n_gpu_layers)")


def test_api_key_outside_printable_ascii_is_one_clear_line(tmp_path: Path) -> None:
    """Review finding: a key like `key€` made every readiness probe raise (a header http.client cannot encode),
    so llama-server was never seen ready and was killed as stalled."""
    keys = tmp_path / "keys"
    keys.write_text("# ops\nplain-key\nkey\u20ac\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"api_key_file=.*: key 2 has a character outside printable ASCII"):
        settings.read_api_keys(str(keys))
