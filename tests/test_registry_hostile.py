"""Hostile registry files (issue 15, items 6, 15, 16): each is refused with one line naming file:line,
exit 2, no traceback, within a memory and time budget."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from wrapper import profiles
from wrapper.cli import main
from wrapper.errors import ConfigError
from wrapper.profiles import safeyaml

REPO = Path(__file__).resolve().parent.parent


def alias_bomb(levels: int) -> str:
    """Billion laughs: each level is nine aliases of the level before; 9 levels is 9**9 values expanded."""
    names = "abcdefghijklmnop"[: levels + 1]
    lines = [f'{names[0]}: &{names[0]} ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in itertools.pairwise(names):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + f"\nprofiles: {{p: {{llamacpp: {{model_path: /m.gguf, extra_args: *{names[-1]}}}}}}}\n"


def profile_with(extra: str) -> str:
    return f"profiles:\n  p:\n    llamacpp:\n      model_path: /m.gguf\n      {extra}\n"


KEY = "sk-SEKRIT-0123456789"

# name -> (registry text, the line the error must name, text the error must contain)
HOSTILE = {
    "alias_bomb_413_bytes": (alias_bomb(5), 6, "aliases expand this to more than 100000 values"),
    "alias_bomb_nine_levels": (alias_bomb(9), 6, "(a YAML alias bomb?)"),
    "recursive_alias": ("profiles: &a\n  p: [*a]\n", 1, "an alias refers to a node that contains it"),
    "nesting_5000_deep_flow": ("profiles: " + "[" * 5000 + "]" * 5000 + "\n", 1, "nested more than 64 levels deep"),
    "nesting_5000_deep_mapping": ("profiles: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n", 1, "nested more than 64"),
    "deep_only_once_aliases_expand": (
        "l1: &l1 " + "[" * 40 + "x" + "]" * 40 + "\n"
        "l2: &l2 " + "[" * 40 + "*l1" + "]" * 40 + "\n"
        "profiles: {p: *l2}\n", 2, "nested more than 64 levels deep once its aliases are expanded"),
    "profile_name_true": ("profiles:\n  true:\n    llamacpp: {model_path: /m.gguf}\n", 2,
                          "profiles.true: profile names must be strings, but YAML reads 'true' as a boolean"),
    "profile_name_1": ("profiles:\n  1:\n    llamacpp: {model_path: /m.gguf}\n", 2, "reads '1' as an integer"),
    "profile_name_null": ("profiles:\n  ~:\n    llamacpp: {model_path: /m.gguf}\n", 2, "reads '~' as null"),
    "setting_key_not_a_string": (profile_with("0x1: 4"), 5, "p.llamacpp.0x1: keys must be strings"),
    "python_tag": ("profiles: !!python/object/apply:os.system [echo hi]\n", 1, "cannot read this YAML value"),
    "impossible_date": (profile_with("model_id: 2001-13-45"), 5, "cannot read this YAML value: month must be in"),
    "api_key_in_extra_args": (profile_with(f"extra_args: [--api-key, {KEY}]"), 5,
                              "p.llamacpp.extra_args: item 0 passes a secret with `--api-key` on llama-server's "
                              "command line"),
    "api_key_with_equals": (profile_with(f'extra_args: "--metrics --api-key={KEY}"'), 5,
                            "item 1 passes a secret with `--api-key`"),
    "api_key_and_value_as_one_item": (profile_with(f'extra_args: ["--api-key {KEY}"]'), 5,
                                      "item 0 passes a secret with `--api-key`"),
    "hf_token_in_extra_args": (profile_with(f"extra_args: [--hf-token, {KEY}]"), 5, "set HF_TOKEN or HF_TOKEN_FILE"),
    "hf_token_short_flag": (profile_with(f"extra_args: [-hft, {KEY}]"), 5, "item 0 passes a secret with `-hft`"),
}

# Run as `python -c`: the address-space cap makes a blow-up a MemoryError (exit 1 with a traceback)
# instead of the machine's problem. Before the fix the 413-byte bomb alone took 1.1 GB.
_UNDER_LIMITS = """
import resource, sys
cap = 256 * 1024 * 1024
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
from wrapper.cli import main
sys.argv = ["wrapper", *sys.argv[1:]]
main()
"""


def validate_in_subprocess(path: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "LLAMACPP_", "WRAPPER_"))}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _UNDER_LIMITS, "profiles", "validate", str(path)],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=env, check=False,
    )
    return done, time.monotonic() - started


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith("  hint: ")]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_validate_refuses_hostile_registry_in_one_line_under_memory_and_time_limits(tmp_path: Path, case: str) -> None:
    text, line, expected = HOSTILE[case]
    path = tmp_path / "llm_profiles.yaml"
    path.write_text(text)
    done, elapsed = validate_in_subprocess(path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = error_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: {path}:{line}: "), lines[0]
    assert expected in lines[0]
    assert KEY not in done.stderr + done.stdout
    assert elapsed < 20, f"{case} took {elapsed:.1f} s"  # ~1 s here, most of it interpreter start-up


def test_alias_bomb_is_refused_before_anything_expands_it(tmp_path: Path) -> None:
    started = time.process_time()
    with pytest.raises(ConfigError, match=r"llm_profiles.yaml:6: aliases expand"):
        profiles.parse(alias_bomb(9), tmp_path / "llm_profiles.yaml")
    assert time.process_time() - started < 2.0  # measured once per shared node, never expanded


def test_file_larger_than_a_registry_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    path = tmp_path / "llm_profiles.yaml"
    with path.open("wb") as f:
        f.write(b"profiles: {}\n#")
        f.truncate(64 * 1024 * 1024)  # sparse: costs no disk
    with pytest.raises(ConfigError, match=r"larger than 1024 KiB; this cannot be a profile registry"):
        profiles.load(path)


def test_anchors_and_merge_keys_within_bounds_still_work(tmp_path: Path) -> None:
    text = (
        "base: &base\n  llamacpp: {model_path: /m.gguf, extra_args: &args [--metrics]}\n"
        "profiles:\n  a:\n    <<: *base\n    display_name: A\n  '1':\n    <<: *base\n"
    )
    reg = profiles.parse(text, tmp_path / "llm_profiles.yaml")
    assert reg.names() == ["1", "a"]
    assert reg.get("1").llamacpp.extra_args == ["--metrics"]
    assert reg.get("a").display_name == "A"


def test_values_just_under_the_bounds_load(tmp_path: Path) -> None:
    # The top-level mapping is one level, so 63 brackets reach exactly MAX_DEPTH.
    nested = "[" * (safeyaml.MAX_DEPTH - 1) + "]" * (safeyaml.MAX_DEPTH - 1)
    reg = profiles.parse(profile_with(f"extra_args: []\nx: {nested}"), tmp_path / "llm_profiles.yaml")
    assert reg.names() == ["p"]
    with pytest.raises(ConfigError, match="nested more than 64 levels deep"):
        profiles.parse(profile_with(f"extra_args: []\nx: [{nested}]"), tmp_path / "llm_profiles.yaml")


@pytest.mark.parametrize("spellings", [("true", "True"), ("1", "0x1", "1.0"), ("true", "1")])
def test_profile_names_yaml_reads_as_one_value_do_not_merge(tmp_path: Path, spellings: tuple[str, ...]) -> None:
    body = "".join(f"  {k}:\n    llamacpp: {{model_path: /m{i}.gguf}}\n" for i, k in enumerate(spellings))
    text = "profiles:\n" + body
    with pytest.raises(ConfigError) as info:
        profiles.parse(text, tmp_path / "llm_profiles.yaml")
    for i, key in enumerate(spellings):
        assert f"llm_profiles.yaml:{2 + 2 * i}: profiles.{key}: profile names must be strings" in str(info.value)


def test_quoted_profile_names_are_strings(tmp_path: Path) -> None:
    text = "profiles:\n" + "".join(f"  '{k}':\n    llamacpp: {{model_path: /m.gguf}}\n"
                                   for k in ("true", "True", "1", "0x1", "1.0"))
    assert profiles.parse(text, tmp_path / "llm_profiles.yaml").names() == ["0x1", "1", "1.0", "True", "true"]


def test_api_key_file_flag_in_extra_args_is_not_a_secret(tmp_path: Path) -> None:
    reg = profiles.parse(profile_with("extra_args: [--api-key-file, /run/secrets/key]"), tmp_path / "r.yaml")
    assert reg.get("p").llamacpp.extra_args == ["--api-key-file", "/run/secrets/key"]


@pytest.mark.parametrize("as_json", [False, True])
def test_api_key_in_extra_args_never_shows_in_profiles_show(tmp_path: Path, as_json: bool) -> None:
    path = tmp_path / "llm_profiles.yaml"
    path.write_text(profile_with(f"extra_args: [--alias, x, --api-key, {KEY}]"))
    args = ["profiles", "show", "p", "--config", str(path), *(["--json"] if as_json else [])]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert KEY not in result.output
    assert "item 2 passes a secret with `--api-key`" in result.stderr and "llamacpp.api_key_file" in result.stderr

