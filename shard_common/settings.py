"""Command-line flags that also read ``SHARD_*`` environment variables (flag wins)."""

from __future__ import annotations

import argparse
import logging
import os


def env_name(flag: str) -> str:
    return "SHARD_" + flag.lstrip("-").replace("-", "_").upper()


def add_option(parser: argparse.ArgumentParser, flag: str, *, default=None, type=str, help: str = "", **kwargs) -> None:
    """``--foo-bar`` defaults to $SHARD_FOO_BAR, then to ``default``; the help text says so."""
    env = env_name(flag)
    if kwargs.get("action") == "store_true":
        raw = os.environ.get(env)
        value = raw.lower() in ("1", "true", "yes", "on") if raw is not None else bool(default)
        parser.add_argument(flag, default=value, help=f"{help} [env {env}]", **kwargs)
        return
    raw = os.environ.get(env)
    value = type(raw) if raw is not None else default
    parser.add_argument(flag, default=value, type=type, help=f"{help} [env {env}; default: {default}]", **kwargs)


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
