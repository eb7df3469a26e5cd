"""What the running llama-server can take: its slots, each slot's context, and prompts sized to fit.

The self-check used to send 128-*word* prompts whatever the server was: on `ctx_size: 512, parallel: 2`
(256 tokens a slot) every request came back HTTP 400 and a healthy server was published as
`verdict: fail, throughput_tps: 0.0` (issue 12). Sizes now come from the server itself: the per-slot
context from `/props` (`default_generation_settings.n_ctx`, which is ctx / parallel as the binary rounds
it), and each prompt's length from `/tokenize`, counted the way the request will be (chat template
applied through `/apply-template`, special tokens added).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import httpx

from wrapper.errors import ServerFailed
from wrapper.measure import loadgen

log = logging.getLogger("wrapper.selfcheck")

# Tokens kept free in a slot beyond prompt + output: llama-server refuses a prompt that fills the slot.
SLOT_MARGIN = 8
# Fewer output tokens than this would measure request overhead, not decoding.
MIN_OUTPUT = 8
# When /tokenize cannot answer (an old build, a proxy in front): a pessimistic tokens-per-word guess.
TOKENS_PER_WORD_GUESS = 2.0


@dataclass(frozen=True)
class ServerFacts:
    slots: int | None
    slot_ctx: int | None  # tokens one slot holds (prompt + output)
    identity: str  # model id, size and parameter count, for the baseline key when no hash is known


@dataclass(frozen=True)
class Sizing:
    prompt_words: int  # the corpus bucket sent
    prompt_tokens: int  # the longest prompt of that bucket as the server counts it (template included)
    max_tokens: int
    counted: bool  # False: prompt_tokens is a guess (the server could not tokenize)
    note: str | None = None  # what was shrunk to fit, in words


class DoesNotFit(Exception):
    """No corpus prompt with MIN_OUTPUT output tokens fits one slot: a configuration problem, not a verdict."""


def headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def server_facts(url: str, api_key: str | None) -> ServerFacts:
    """Slots, per-slot context and model identity from llama-server's /props and /v1/models."""
    try:
        with httpx.Client(base_url=url, timeout=5.0, headers=headers(api_key), trust_env=False) as client:
            props = client.get("/props").json()
            models = client.get("/v1/models").json().get("data") or [{}]
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        raise ServerFailed(f"selfcheck: llama-server at {url} is not answering ({type(exc).__name__}: {exc})",
                           hint="check the URL and that the server is ready (GET /health)") from None
    meta = models[0].get("meta") or {}
    identity = f"{models[0].get('id', '?')}:size={meta.get('size', '?')}:params={meta.get('n_params', '?')}"
    slots = props.get("total_slots")
    n_ctx = (props.get("default_generation_settings") or {}).get("n_ctx")
    return ServerFacts(int(slots) if slots else None, int(n_ctx) if n_ctx else None, identity)


class _Counter:
    """Token counts of corpus prompts, asked of the server once per prompt."""

    def __init__(self, client: httpx.Client, endpoint: loadgen.Endpoint) -> None:
        self.client, self.endpoint = client, endpoint
        self.available = True

    def count(self, prompt: loadgen.Prompt) -> int:
        if self.available:
            try:
                text = prompt.text
                if self.endpoint == "chat":
                    text = self.client.post("/apply-template", json={
                        "messages": [{"role": "user", "content": text}]}).raise_for_status().json()["prompt"]
                tokens = self.client.post("/tokenize", json={"content": text, "add_special": True,
                                                             "parse_special": True}).raise_for_status()
                return len(tokens.json()["tokens"])
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                log.warning("selfcheck: the server could not count tokens (%s); guessing %.0f a word",
                            type(exc).__name__, TOKENS_PER_WORD_GUESS)
                self.available = False
        return int(prompt.words * TOKENS_PER_WORD_GUESS) + 16

    def bucket(self, words: int) -> int:
        """The longest prompt of a corpus bucket, in tokens: every request of the run must fit."""
        return max(self.count(p) for p in loadgen.corpus() if p.words == words)


def size(url: str, api_key: str | None, endpoint: loadgen.Endpoint, slot_ctx: int | None, *,
         prompt_tokens: int, max_tokens: int, prompt_words: int | None = None) -> Sizing:
    """The prompt bucket and output length for one slot of `slot_ctx` tokens.

    prompt_words: an exact bucket to repeat (a tuned cell's load), kept when it fits. Otherwise the longest
    bucket within `prompt_tokens` real tokens. Then, if prompt + output would overflow the slot, the
    prompt shrinks first (the output length is what throughput is made of), then the output.
    """
    buckets = sorted({p.words for p in loadgen.corpus()})
    with httpx.Client(base_url=url, timeout=10.0, headers=headers(api_key), trust_env=False) as client:
        counter = _Counter(client, endpoint)
        counts: dict[int, int] = {}

        def tokens(words: int) -> int:
            if words not in counts:
                counts[words] = counter.bucket(words)
            return counts[words]

        if prompt_words is not None:
            wanted = min(buckets, key=lambda w: (abs(w - prompt_words), w))
        else:
            # Ascending, stopping at the first bucket over the target: long buckets are never tokenized.
            wanted = buckets[0]
            for words in buckets:
                if tokens(words) > prompt_tokens:
                    break
                wanted = words
        if slot_ctx is None:
            return Sizing(wanted, tokens(wanted), max_tokens, counter.available)
        budget = slot_ctx - SLOT_MARGIN
        for words in sorted((w for w in buckets if w <= wanted), reverse=True):
            if tokens(words) + max_tokens <= budget:
                note = None if words == wanted else (
                    f"prompts of {wanted} words ({tokens(wanted)} tokens) + {max_tokens} output tokens do not fit "
                    f"a {slot_ctx}-token slot: sent {words}-word prompts ({tokens(words)} tokens)")
                return Sizing(words, tokens(words), max_tokens, counter.available, note)
        smallest = buckets[0]
        out = budget - tokens(smallest)
        if out < MIN_OUTPUT:
            raise DoesNotFit(f"a {slot_ctx}-token slot cannot hold the shortest prompt ({tokens(smallest)} tokens) "
                             f"and {MIN_OUTPUT} output tokens")
        note = (f"{max_tokens} output tokens do not fit a {slot_ctx}-token slot beside the shortest prompt "
                f"({tokens(smallest)} tokens): generated {out}")
        return Sizing(smallest, tokens(smallest), out, counter.available, note)
