"""Run the `wrapper` CLI with NVML replaced by a recorded reading, counting how often it is read.

    python tests/fakes/with_nvml.py READING.json COUNT_FILE wrapper-args...

The count (one line per read) is appended to COUNT_FILE as the reads happen, so a process stopped by a
signal still leaves it behind.
"""

import json
import sys
from pathlib import Path

from wrapper.plan import hardware

reading_path, count_path, *args = sys.argv[1:]
reading = json.loads(Path(reading_path).read_text())


def recorded() -> dict[str, object]:
    with Path(count_path).open("a") as fh:
        fh.write("read\n")
    return json.loads(json.dumps(reading))


hardware.read_nvml = recorded  # type: ignore[assignment]
sys.argv = ["wrapper", *args]
from wrapper.cli import main  # noqa: E402

main()
