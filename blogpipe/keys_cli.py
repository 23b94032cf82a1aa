"""``blogpipe keys create|list|revoke`` — manage API keys; and the key ``blogpipe dev`` makes.

A key is printed once, by ``create``; only its hash is stored. Every change is written
to the audit log as done by the CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from core.db import audit
from core.db.apikeys import SCOPES, ApiKeyError, ApiKeyRepository, looks_like_key
from core.settings import Settings

T = TypeVar("T")

DEV_TENANT = "local"
DEV_KEY_FILE = "api_key"


def register(sub: Any) -> None:
    """Add the ``keys`` command and its subcommands to the CLI's subparsers."""
    keys = sub.add_parser("keys", help="create, list and revoke API keys")
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="create a key (printed once)")
    create.add_argument("--tenant", required=True, help="the tenant the key acts for")
    create.add_argument(
        "--scope",
        action="append",
        required=True,
        choices=SCOPES,
        dest="scopes",
        help="a scope to grant (repeatable)",
    )
    create.add_argument("--name", help="a label to recognise the key by")
    create.set_defaults(func=cmd_create)
    listing = actions.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--tenant", help="only this tenant's keys")
    listing.set_defaults(func=cmd_list)
    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id", metavar="ID")
    revoke.set_defaults(func=cmd_revoke)


def _with_repository(settings: Settings, work: Callable[[ApiKeyRepository], Awaitable[T]]) -> T:
    from core.db.engine import create_engine, resolve_database_url

    async def run() -> T:
        engine = create_engine(resolve_database_url(settings), pool_size=1)
        try:
            return await work(ApiKeyRepository(engine))
        finally:
            await engine.dispose()

    return asyncio.run(run())


def cmd_create(settings: Settings, args: argparse.Namespace) -> int:
    try:
        key, secret = _with_repository(
            settings,
            lambda keys: keys.create(
                args.tenant, args.scopes, name=args.name, actor=audit.Actor.cli(args.tenant)
            ),
        )
    except ApiKeyError as exc:
        print(f"blogpipe: {exc}", file=sys.stderr)
        return 2
    print(f"Created key {key.id} for tenant {key.tenant} with scopes {', '.join(key.scopes)}.")
    print("The key is shown only this once; store it now:")
    print(secret)
    return 0


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    keys = _with_repository(settings, lambda repo: repo.list(tenant=args.tenant))
    if not keys:
        print("No API keys.")
        return 0
    print(f"{'ID':<22} {'TENANT':<16} {'PREFIX':<14} {'SCOPES':<32} {'STATUS':<8} CREATED")
    for key in keys:
        status = "active" if key.active else "revoked"
        print(
            f"{key.id:<22} {key.tenant:<16} {key.prefix + '…':<14} {','.join(key.scopes):<32}"
            f" {status:<8} {key.created_at:%Y-%m-%d %H:%M}"
            + (f"  ({key.name})" if key.name else "")
        )
    return 0


def cmd_revoke(settings: Settings, args: argparse.Namespace) -> int:
    async def revoke(keys: ApiKeyRepository) -> Any:
        found = await keys.get(args.key_id)
        if found is None:
            return None
        return await keys.revoke(args.key_id, actor=audit.Actor.cli(found.tenant))

    key = _with_repository(settings, revoke)
    if key is None:
        print(f"blogpipe: no API key {args.key_id}", file=sys.stderr)
        return 1
    print(f"Revoked key {key.id} of tenant {key.tenant}.")
    return 0


async def ensure_dev_key(engine: AsyncEngine, data_dir: Path) -> str:
    """The local tenant's key for ``blogpipe dev``: kept under the data dir, made if needed."""
    path = data_dir / DEV_KEY_FILE
    keys = ApiKeyRepository(engine)
    if path.exists():
        secret = path.read_text().strip()
        if looks_like_key(secret) and await keys.authenticate(secret) is not None:
            return secret
    _, secret = await keys.create(
        DEV_TENANT, SCOPES, name="blogpipe dev", actor=audit.Actor.system(DEV_TENANT)
    )
    data_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, at dev start-up
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return secret
