"""Write the frozen prompt corpus wrapper/measure/data/prompts-v<N>.jsonl from generated text (no downloads).

The corpus is committed; this script documents how it was made and lets CI check it is unchanged:
`python scripts/make_prompt_corpus.py --check`. Each line is one prompt:
{"id": "w0064-03", "words": 64, "text": "..."}. Lengths are in words of plain English, which common
BPE tokenizers turn into roughly 1.1-1.4 tokens each; the server's own `usage` gives the exact count.
Changing the output means a new version (new file name, new sha256 in wrapper/loadgen.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

VERSION = 1
SEED = 20250101
LENGTHS = (16, 32, 64, 128, 256, 512, 1024)
PER_LENGTH = 16

# A small, hand-written vocabulary: everyday words so real tokenizers see ordinary text.
_WORDS = """
the a of and to in is that it for on with as was at by from this be or are an have not they but
which one all were we when there can more if no out so what up about into than them only other new
some could time these two may first then do any like my now over such our man me even most made after
also did many before must through back years where much your way well down should because each just
those people how too little state good very make world still own see men work long get here between
both life being under never day same another know while last might us great old year off come since
against go came right used take three river garden window morning evening letter market road bridge
mountain village kitchen engine station harbour forest lamp table paper music winter summer bread
water stone light field door question answer story reason number system problem result method
model figure measure signal pattern memory thread process request response server client cache token
quiet bright careful simple early late open closed heavy narrow wide slow quick warm cold green blue
walk carry build write read listen follow remember explain describe compare measure repair gather
""".split()

_OPENERS = (
    "Summarise the following notes in one paragraph.",
    "Continue this passage in the same style.",
    "List the main ideas in the text below.",
    "Rewrite the following text more clearly.",
)


def _sentence(rng: random.Random, length: int) -> str:
    words = [rng.choice(_WORDS) for _ in range(length)]
    return " ".join(words).capitalize() + "."


def _prompt(rng: random.Random, words: int) -> str:
    opener = rng.choice(_OPENERS)
    remaining = words - len(opener.split())
    parts = [opener]
    while remaining > 0:
        n = min(remaining, rng.randint(6, 14))
        parts.append(_sentence(rng, n))
        remaining -= n
    return " ".join(parts)


def build() -> bytes:
    rng = random.Random(SEED)
    lines = []
    for words in LENGTHS:
        for i in range(PER_LENGTH):
            record = {"id": f"w{words:04d}-{i:02d}", "words": words, "text": _prompt(rng, words)}
            lines.append(json.dumps(record, sort_keys=True, ensure_ascii=True))
    return ("\n".join(lines) + "\n").encode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parent.parent / "wrapper" / "measure" / "data"
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--check", action="store_true", help="fail if the committed file differs")
    args = parser.parse_args()
    data = build()
    path = args.out / f"prompts-v{VERSION}.jsonl"
    digest = hashlib.sha256(data).hexdigest()
    if args.check:
        same = path.exists() and path.read_bytes() == data
        print(f"{path}: {'unchanged' if same else 'DIFFERS'} sha256={digest}")
        return 0 if same else 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    print(f"wrote {path} ({len(data)} bytes) sha256={digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
