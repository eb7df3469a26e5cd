"""Will a cell's requests fit its server's per-slot context? Decided before the cell runs.

llama-server splits `ctx_size` across `parallel` slots and rounds each slot up to a multiple of 256
(measured on this build: -c 500 -np 3 gives 256-token slots, -c 700 -np 2 gives 512); with its automatic
slot count (no --parallel) the KV cache is unified and one request may use all of it. A request longer than
its slot fails with HTTP 400, so before this check a sweep recorded such cells as errors and picked its
"best" from what was left (issue 12). Prompt lengths are counted in the model's own tokens by the first
server the sweep starts (`/apply-template` then `/tokenize`): a word can be many tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx

from wrapper.measure import loadgen

SLOT_ROUND = 256
AUTO_SLOTS = 4  # llama-server's slot count without --parallel (this build), with one unified KV cache


def slot_ctx(merged: dict[str, Any], streams: int = 1) -> tuple[int | None, str]:
    """(tokens a request may use with `streams` requests in flight, how that follows from the settings);
    None when the model decides (ctx_size 0 or unset: its training context, known once a server runs)."""
    ctx, parallel = merged.get("ctx_size"), merged.get("parallel")
    if not ctx:
        return None, "ctx_size from the model"
    if not parallel:
        # One unified cache: a lone request may use all of it, concurrent ones share it (HTTP 500
        # "Context size has been exceeded" otherwise, seen at ctx 1024 with 4 streams of 790 tokens).
        share = min(max(1, streams), AUTO_SLOTS)
        return _round(ctx) // share, (f"ctx_size {ctx} unified across llama-server's automatic slots, shared by "
                                      f"{share} concurrent requests")
    per = _round(ctx // parallel)
    return per, f"ctx_size {ctx} / parallel {parallel}, rounded up to {SLOT_ROUND} by llama-server"


def _round(n: int) -> int:
    return max(SLOT_ROUND, -(-n // SLOT_ROUND) * SLOT_ROUND)


def reason(prompt_words: int, max_tokens: int, slot: int | None, how: str, tokens: dict[int, int] | None) -> str | None:
    """Why a request of this shape cannot fit a slot of `slot` tokens, or None. Without token counts a
    word counts as one token (a lower bound), so the check stays certain."""
    if slot is None:
        return None
    counted = tokens is not None and prompt_words in tokens
    prompt = tokens[prompt_words] if tokens is not None and counted else prompt_words
    if prompt + max_tokens <= slot:
        return None
    what = f"{prompt} prompt tokens" if counted else f">= {prompt} prompt tokens ({prompt_words} words)"
    return f"does not fit: {what} + {max_tokens} output > {slot}-token slot ({how})"


def count_prompt_tokens(url: str, prompt_words: Iterable[int], *, timeout_s: float = 10.0) -> dict[int, int] | None:
    """The longest prompt of each corpus length, in tokens, as the server will see it (chat template
    included); None when the server cannot say (an older build without /tokenize)."""
    out: dict[int, int] = {}
    try:
        with httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s, verify=loadgen.tls_context()) as client:
            for words in sorted(set(prompt_words)):
                out[words] = max(_tokens(client, p.text) for p in bucket(words))
    except (httpx.HTTPError, ValueError, KeyError):
        return None
    return out


def bucket(prompt_words: int) -> list[loadgen.Prompt]:
    """Every prompt the load generator may pick for this length (it picks from one corpus length)."""
    chosen = loadgen.select(1, 0, prompt_words)[0].words
    return [p for p in loadgen.corpus() if p.words == chosen]


def _tokens(client: httpx.Client, text: str) -> int:
    templated = client.post("/apply-template", json={"messages": [{"role": "user", "content": text}]})
    prompt = templated.json()["prompt"] if templated.status_code == 200 else text
    r = client.post("/tokenize", json={"content": prompt, "add_special": True, "parse_special": True})
    r.raise_for_status()
    return len(r.json()["tokens"])


@dataclass(frozen=True)
class Served:
    """What a running llama-server reports about its slots (/props); None where it does not say."""

    slot_ctx: int | None = None  # tokens per slot, as the binary rounds ctx / parallel
    slots: int | None = None


def served(url: str, *, timeout_s: float = 5.0) -> Served:
    try:
        r = httpx.get(url.rstrip("/") + "/props", timeout=timeout_s, verify=loadgen.tls_context())
        return from_props(r.json()) if r.status_code == 200 else Served()
    except (httpx.HTTPError, ValueError):
        return Served()


def from_props(props: object) -> Served:
    """Served from a /props answer; a field missing or of the wrong shape reads as unknown."""
    if not isinstance(props, dict):
        return Served()
    settings = props.get("default_generation_settings")
    n = settings.get("n_ctx") if isinstance(settings, dict) else None
    return Served(_positive(n), _positive(props.get("total_slots")))


def _positive(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None
