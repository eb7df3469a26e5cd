"""Export the event JSON schemas: `python -m wrapper.events --schemas docs/schemas/`."""

import argparse
from pathlib import Path

from wrapper.events.payloads import write_schemas

parser = argparse.ArgumentParser(description="Export the event JSON schemas.")
parser.add_argument("--schemas", type=Path, required=True, metavar="DIR")
for path in write_schemas(parser.parse_args().schemas):
    print(path)
