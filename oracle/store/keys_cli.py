"""``shard-oracle keys ...``: manage API keys in the same Redis the Oracle uses."""

from __future__ import annotations

import argparse
import asyncio
import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .keys import KeyStore, UnknownKey
from .redis_server import EmbeddedRedis, async_client


async def _run(args: argparse.Namespace, url: str) -> int:
    client = async_client(url)
    store = KeyStore(client, args.redis_prefix)
    console = Console(stderr=True)
    try:
        if args.keys_command == "create":
            role = "admin" if args.admin else "user"
            rpm = args.rpm if args.rpm is not None else (0 if args.admin else args.default_rpm)
            tpm = args.tpm if args.tpm is not None else (0 if args.admin else args.default_tpm)
            try:
                secret, record = await store.create(args.name, role=role, rpm=rpm, tpm=tpm)
            except ValueError as e:
                console.print(f"[red]error:[/red] {e}")
                return 2
            print(secret)
            console.print(f"created {role} key {record.name!r} (id {record.id}); it is shown only this once")
        elif args.keys_command == "list":
            table = Table("id", "name", "prefix", "role", "rpm", "tpm", "created", "state")
            for k in await store.list():
                created = datetime.datetime.fromtimestamp(k.created).strftime("%Y-%m-%d %H:%M")
                table.add_row(k.id, k.name, k.prefix + "…", k.role, str(k.rpm or "∞"), str(k.tpm or "∞"), created,
                              "revoked" if k.revoked else "active")
            Console(width=max(120, Console().width)).print(table)
        elif args.keys_command == "revoke":
            try:
                record = await store.revoke(args.key)
            except UnknownKey as e:
                console.print(f"[red]error:[/red] {e}")
                return 2
            console.print(f"revoked key {record.name!r} (id {record.id})")
        return 0
    finally:
        await client.aclose()


def run_keys_command(args: argparse.Namespace) -> int:
    embedded = None
    url = args.redis_url
    if not url:
        # The Oracle's embedded Redis if it is running, else one started just for this command.
        embedded = EmbeddedRedis(Path(args.data_dir) / "redis").start()
        url = embedded.url
    try:
        return asyncio.run(_run(args, url))
    finally:
        if embedded is not None:
            embedded.stop()
