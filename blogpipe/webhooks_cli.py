"""``blogpipe deliveries JOB_ID`` and ``blogpipe redeliver …`` — inspect and resend webhooks."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from uuid import UUID

from core.settings import Settings
from notifier.operations import DEFAULT_RECOVER_CAP, WebhookOperations, parse_since

T = TypeVar("T")


def register(sub: Any) -> None:
    """Add the webhook commands to the CLI's subparsers."""
    deliveries = sub.add_parser("deliveries", help="list a job's webhook deliveries and attempts")
    deliveries.add_argument("job_id", metavar="JOB_ID")
    deliveries.set_defaults(func=cmd_deliveries)

    redeliver = sub.add_parser(
        "redeliver", help="resend one delivery, or recover failed ones in bulk"
    )
    redeliver.add_argument("delivery_id", nargs="?", metavar="DELIVERY_ID")
    redeliver.add_argument("--failed", action="store_true", help="recover failed deliveries")
    redeliver.add_argument("--since", default="6h", help="with --failed: 6h, 30m, 2d or ISO time")
    redeliver.add_argument(
        "--cap", type=int, default=DEFAULT_RECOVER_CAP, help="with --failed: at most this many"
    )
    redeliver.add_argument("--dry-run", action="store_true", help="count, change nothing")
    redeliver.set_defaults(func=cmd_redeliver)


def _run(settings: Settings, work: Callable[[WebhookOperations], Awaitable[T]]) -> T:
    from core.db.engine import create_engine, resolve_database_url

    async def run() -> T:
        engine = create_engine(resolve_database_url(settings), pool_size=1)
        try:
            return await work(WebhookOperations(engine, settings))
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _uuid(value: str, flag: str) -> UUID | None:
    try:
        return UUID(value)
    except ValueError:
        print(f"blogpipe: error: {flag} must be a UUID, got {value!r}", file=sys.stderr)
        return None


def cmd_deliveries(settings: Settings, args: argparse.Namespace) -> int:
    job_id = _uuid(args.job_id, "JOB_ID")
    if job_id is None:
        return 2
    histories = _run(settings, lambda ops: ops.deliveries_for_job(job_id))
    if not histories:
        print(f"No webhook deliveries for job {job_id}")
        return 0
    for history in histories:
        d = history.delivery
        print(f"{d.id}  {d.event_type:<14} {d.status:<10} attempts={d.attempt_count}  {d.url}")
        for a in history.attempts:
            outcome = a.status_code if a.status_code is not None else (a.error or "-")
            latency = f"{a.latency_ms:.0f} ms" if a.latency_ms is not None else "-"
            print(
                f"    #{a.attempt} {a.created_at:%Y-%m-%d %H:%M:%S}Z  {a.trigger:<8} "
                f"{outcome}  {latency}"
            )
    return 0


def cmd_redeliver(settings: Settings, args: argparse.Namespace) -> int:
    if args.failed == bool(args.delivery_id):
        print("blogpipe: error: give either DELIVERY_ID or --failed", file=sys.stderr)
        return 2
    if args.delivery_id:
        delivery_id = _uuid(args.delivery_id, "DELIVERY_ID")
        if delivery_id is None:
            return 2
        delivery = _run(settings, lambda ops: ops.redeliver(delivery_id))
        if delivery is None:
            print(
                f"blogpipe: error: delivery {delivery_id} not found (or an attempt is in flight)",
                file=sys.stderr,
            )
            return 1
        print(f"Redelivery of {delivery.id} queued (job {delivery.job_id}); the notifier sends it")
        return 0
    if args.cap < 1:
        print("blogpipe: error: --cap must be at least 1", file=sys.stderr)
        return 2
    try:
        since = parse_since(args.since)
    except ValueError as exc:
        print(f"blogpipe: error: --since: {exc}", file=sys.stderr)
        return 2
    result = _run(
        settings, lambda ops: ops.recover_failed(since=since, cap=args.cap, dry_run=args.dry_run)
    )
    if args.dry_run:
        print(
            f"{result.matching} failed deliveries since {since:%Y-%m-%d %H:%M}Z; "
            f"would re-queue {min(result.matching, result.cap)} (cap {result.cap}). Dry run."
        )
    else:
        print(
            f"Re-queued {len(result.delivery_ids)} of {result.matching} failed deliveries "
            f"since {since:%Y-%m-%d %H:%M}Z (cap {result.cap})"
        )
    return 0
