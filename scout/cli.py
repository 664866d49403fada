"""``shard-scout``: a volunteer node serving a span of blocks."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="shard-scout",
        description="A Shard Scout serves a span of the model's blocks to an Oracle over the swarm.",
    )
    parser.parse_args(argv)
    print("shard-scout: joining a swarm is not implemented yet; see docs/status.md", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
