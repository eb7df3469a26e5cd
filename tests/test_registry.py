"""Registry and schema: every bad input gets one clear line with file:line and the setting path."""

from __future__ import annotations

from pathlib import Path

import pytest

from wrapper import profiles
from wrapper.errors import ConfigError, ProfileNotFound, RegistryNotFound
from wrapper.profiles.registry import DEFAULT_PATHS

GOOD = """\
profiles:
  alpha:
    display_name: "A"
    backend: llamacpp
    llamacpp:
      model_path: /m/a.gguf
      port: 8080
  beta:
    llamacpp:
      hf_repo_id: org/repo-GGUF
      hf_filename: model-Q4_K_M.gguf
"""


def load_text(tmp_path: Path, text: str) -> profiles.Registry:
    path = tmp_path / "llm_profiles.yaml"
    path.write_text(text)
    return profiles.load(path)


def error_for(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    return str(info.value)


def test_good_registry_loads_every_profile(tmp_path: Path) -> None:
    reg = load_text(tmp_path, GOOD)
    assert reg.names() == ["alpha", "beta"]
    assert reg.get("beta").llamacpp.hf_filename == "model-Q4_K_M.gguf"
    assert reg.get("alpha").llamacpp.port == 8080


def test_shipped_registry_is_valid() -> None:
    reg = profiles.load(Path(__file__).parent.parent / "config" / "llm_profiles.yaml")
    assert {"tiny-dense", "tiny-moe", "qwen-7b"} <= set(reg.names())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the file is empty"),
        ("profiles:\n  a: [1, 2\n", "YAML syntax error"),
        ("models:\n  a: {}\n", "missing the top-level 'profiles:' key"),
        ("- a\n- b\n", "missing the top-level 'profiles:' key (found a list)"),
        ("profiles: [1]\n", "profiles: must be a mapping"),
    ],
)
def test_structural_errors(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error_for(tmp_path, text)


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    msg = error_for(tmp_path, "profiles:\n  a:\n    llamacpp: {model_path: x\n  b: 1\n")
    assert "llm_profiles.yaml:" in msg
    assert "YAML syntax error" in msg


BAD_FIELDS = [
    ("port: -1", "llamacpp.port", "greater than or equal to 1"),
    ("port: 70000", "llamacpp.port", "less than or equal to 65535"),
    ("ctx_size: -5", "llamacpp.ctx_size", "greater than or equal to 0"),
    ("threads: 0", "llamacpp.threads", "greater than or equal to 1"),
    ("threads: many", "llamacpp.threads", "valid integer"),
    ("parallel: 2.5", "llamacpp.parallel", "valid integer"),
    ("ctx_sise: 4096", "llamacpp.ctx_sise", "unknown key (did you mean 'ctx_size'?)"),
    ("cache_type_k: q9", "llamacpp.cache_type_k", "'f16'"),
    ("flash_attn: maybe", "llamacpp.flash_attn", "'on'"),
]


@pytest.mark.parametrize(("line", "path", "expected"), BAD_FIELDS)
def test_bad_field_reports_path_line_and_reason(tmp_path: Path, line: str, path: str, expected: str) -> None:
    text = f"profiles:\n  p:\n    llamacpp:\n      model_path: /m.gguf\n      {line}\n"
    msg = error_for(tmp_path, text)
    assert f"llm_profiles.yaml:5: p.{path}: " in msg
    assert expected in msg


def test_unknown_top_level_key_suggests_and_lists(tmp_path: Path) -> None:
    msg = error_for(tmp_path, "profiles:\n  p:\n    dispaly_name: x\n    llamacpp: {model_path: /m.gguf}\n")
    assert "llm_profiles.yaml:3: p.dispaly_name: unknown key (did you mean 'display_name'?)" in msg


def test_backend_must_be_llamacpp(tmp_path: Path) -> None:
    msg = error_for(tmp_path, "profiles:\n  p:\n    backend: vllm\n    llamacpp: {model_path: /m.gguf}\n")
    assert "p.backend: Input should be 'llamacpp' (got 'vllm')" in msg


@pytest.mark.parametrize("name", ["../evil.gguf", "sub/model.gguf", "..", "a\\\\b.gguf"])
def test_hf_filename_must_be_plain(tmp_path: Path, name: str) -> None:
    msg = error_for(tmp_path, f'profiles:\n  p:\n    llamacpp:\n      hf_repo_id: o/r\n      hf_filename: "{name}"\n')
    assert "p.llamacpp.hf_filename: must be a plain file name" in msg


def test_hf_subfolder_rejects_escape(tmp_path: Path) -> None:
    msg = error_for(
        tmp_path, "profiles:\n  p:\n    llamacpp:\n      hf_repo_id: o/r\n      hf_filename: a.gguf\n"
        "      hf_subfolder: ../up\n"
    )
    assert "hf_subfolder: must be a folder inside the repo" in msg


def test_model_path_and_hf_spec_are_exclusive(tmp_path: Path) -> None:
    msg = error_for(
        tmp_path, "profiles:\n  p:\n    llamacpp:\n      model_path: /m.gguf\n      hf_repo_id: o/r\n"
        "      hf_filename: a.gguf\n"
    )
    assert "set either model_path or hf_repo_id + hf_filename, not both" in msg


def test_no_model_source(tmp_path: Path) -> None:
    assert "no model: set model_path" in error_for(tmp_path, "profiles:\n  p:\n    llamacpp: {port: 1}\n")


def test_hf_repo_without_filename(tmp_path: Path) -> None:
    msg = error_for(tmp_path, "profiles:\n  p:\n    llamacpp: {hf_repo_id: o/r}\n")
    assert "hf_filename is missing" in msg


def test_duplicate_profile_names_are_caught(tmp_path: Path) -> None:
    text = "profiles:\n  p:\n    llamacpp: {model_path: /a}\n  p:\n    llamacpp: {model_path: /b}\n"
    msg = error_for(tmp_path, text)
    assert "llm_profiles.yaml:4: profiles.p: duplicate key (first defined on line 2)" in msg


def test_all_problems_reported_together(tmp_path: Path) -> None:
    text = (
        "profiles:\n  a:\n    llamacpp: {model_path: /a, port: 0}\n"
        "  b:\n    llamacpp: {model_path: /b, threads: -1}\n"
    )
    msg = error_for(tmp_path, text)
    assert msg.startswith(f"{tmp_path / 'llm_profiles.yaml'}: 2 problems")
    assert "a.llamacpp.port" in msg and "b.llamacpp.threads" in msg


def test_profile_not_found_lists_names_and_closest(tmp_path: Path) -> None:
    reg = load_text(tmp_path, GOOD)
    with pytest.raises(ProfileNotFound) as info:
        reg.get("alpah")
    assert "LLM profile 'alpah' not found" in str(info.value)
    assert "did you mean 'alpha'?" in info.value.hint
    assert "alpha, beta" in info.value.hint


def test_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = tmp_path / "x.yaml"
    explicit.write_text(GOOD)
    assert profiles.resolve_path(str(explicit), "/nonexistent") == explicit
    assert profiles.resolve_path(None, str(explicit)) == explicit
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "llm_profiles.yaml").write_text(GOOD)
    assert profiles.resolve_path(None, None) == Path("config/llm_profiles.yaml")


def test_missing_registry_is_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RegistryNotFound) as info:
        profiles.resolve_path(None, str(tmp_path / "nope.yaml"))
    assert "LLM_PROFILES_CONFIG_PATH=" in str(info.value)
    # The container path is passed in, so the result does not depend on whether this machine has an
    # /app/config/llm_profiles.yaml (the assert used to be skipped where it had one).
    app = tmp_path / "app" / "config" / "llm_profiles.yaml"
    defaults = (Path("config/llm_profiles.yaml"), app)
    with pytest.raises(RegistryNotFound) as info:
        profiles.resolve_path(None, None, defaults)
    assert f"looked in config/llm_profiles.yaml, {app}" in str(info.value)
    app.parent.mkdir(parents=True)
    app.write_text(GOOD)
    assert profiles.resolve_path(None, None, defaults) == app


def test_default_search_order_is_local_then_container() -> None:
    assert list(DEFAULT_PATHS) == [Path("config/llm_profiles.yaml"), Path("/app/config/llm_profiles.yaml")]


def test_union_errors_are_one_line(tmp_path: Path) -> None:
    msg = error_for(tmp_path, "profiles:\n  p:\n    llamacpp:\n      model_path: /m.gguf\n      n_gpu_layers: -5\n")
    # One problem is the whole message, on one line (several are listed under a heading).
    assert msg == (f"{tmp_path / 'llm_profiles.yaml'}:5: p.llamacpp.n_gpu_layers: Input should be greater than "
                   "or equal to 0 or 'auto' or 'all' (got -5)")


def test_forgiving_spellings(tmp_path: Path) -> None:
    reg = load_text(tmp_path, "profiles:\n  p:\n    gpu: {device_ids: 1}\n    llamacpp:\n      model_path: /m.gguf\n"
                              "      n_gpu_layers: -1\n      cache_type_k: Q8_0\n"
                              "      extra_args: \"--metrics --alias 'my model'\"\n")
    spec = reg.get("p")
    assert spec.gpu.device_ids == [1]
    assert spec.llamacpp.n_gpu_layers == "all" and spec.llamacpp.cache_type_k == "q8_0"
    assert spec.llamacpp.extra_args == ["--metrics", "--alias", "my model"]
