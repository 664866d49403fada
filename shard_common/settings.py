"""Command-line flags that also read ``SHARD_*`` environment variables (flag wins)."""

from __future__ import annotations

import argparse
import json
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


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the request id when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if getattr(record, "request_id", None):
            entry["request_id"] = record.request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)
