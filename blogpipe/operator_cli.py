"""Operator commands: ``blogpipe replay|cancel|jobs|dlq|cleanup``.

They talk to the database (and, to publish replays, the broker) directly, like the API
does, and record the actor as ``cli:<user>``.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

from core.constants import JOB_STATUSES, STAGES
from core.errors import BlogpipeError
from core.settings import Settings

T = TypeVar("T")


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name in some containers
        return "cli:unknown"


def _uuid(raw: str) -> UUID:
    try:
        return UUID(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a job id: {raw!r}") from None


def _with_runtime(settings: Settings, work: Callable[[Any], Awaitable[T]]) -> T:
    from blogpipe.runtime import Runtime

    async def run() -> T:
        runtime = await Runtime.open(settings)
        try:
            return await work(runtime)
        finally:
            await runtime.close()

    return asyncio.run(run())


async def _audit(
    runtime: Any, action: str, target: str, details: dict[str, Any], job_id: UUID | None = None
) -> None:
    """CLI operator actions are audited like the API's, under the job's tenant."""
    from core.db import audit

    tenant = "default"
    if job_id is not None:
        job = await runtime.jobs.get(job_id)
        tenant = job.tenant if job is not None else tenant
    await audit.record(
        runtime.engine, audit.Actor(tenant=tenant, name=_actor()), action, target, details
    )


def _operations(runtime: Any) -> Any:
    from core.db.operations import OperationsStore

    return OperationsStore(runtime.engine, runtime.dispatcher)


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    from core.db.operations import JobFilter, parse_duration

    if args.job_id is None and not (args.status or args.stage or args.since):
        raise BlogpipeError(
            "give a JOB_ID, or a filter (--status, --stage, --since) to bulk replay"
        )
    if args.job_id is not None:

        async def replay_one(rt: Any) -> Any:
            result = await _operations(rt).replay(
                args.job_id, actor=_actor(), from_stage=args.from_stage, reason=args.reason
            )
            await _audit(rt, "job.replay", str(args.job_id), result.to_json(), args.job_id)
            return result

        result = _with_runtime(settings, replay_one)
        print(
            f"Job {result.job_id} replayed from {result.from_stage}"
            f" (generation {result.generation}, was {result.previous_status})"
        )
        return 0
    cap = min(args.limit or settings.replay_cap, settings.replay_cap)
    where = JobFilter(
        status=args.status or "failed",
        stage=args.stage,
        since_seconds=parse_duration(args.since) if args.since else None,
    )

    async def replay_many(rt: Any) -> Any:
        outcome = await _operations(rt).bulk_replay(
            where,
            actor=_actor(),
            from_stage=args.from_stage,
            reason=args.reason,
            cap=cap,
            dry_run=args.dry_run,
        )
        if not args.dry_run:
            await _audit(rt, "job.bulk_replay", "jobs", outcome.to_json())
        return outcome

    outcome = _with_runtime(settings, replay_many)
    verb = "would replay" if args.dry_run else "replayed"
    count = len(outcome.job_ids) if args.dry_run else len(outcome.replayed)
    print(f"{outcome.matched} job(s) match; {verb} {count} (cap {cap})")
    for job_id in outcome.job_ids:
        print(f"  {job_id}  {outcome.skipped.get(str(job_id), '')}".rstrip())
    if outcome.truncated:
        print(
            f"{outcome.matched - len(outcome.job_ids)} more not included: raise --limit"
            " (at most BLOGPIPE_REPLAY_CAP) or run again"
        )
    return 0


def cmd_cancel(settings: Settings, args: argparse.Namespace) -> int:
    async def cancel(rt: Any) -> Any:
        result = await _operations(rt).cancel(args.job_id, actor=_actor(), reason=args.reason)
        await _audit(rt, "job.cancel", str(args.job_id), result.to_json(), args.job_id)
        return result

    result = _with_runtime(settings, cancel)
    print(f"Job {result.job_id} cancelled (was {result.previous_status})")
    return 0


def cmd_jobs_list(settings: Settings, args: argparse.Namespace) -> int:
    async def work(rt: Any) -> list[Any]:
        jobs, _ = await rt.jobs.page(status=args.status, limit=args.limit)
        return list(jobs)

    jobs = _with_runtime(settings, work)
    print(f"{'JOB ID':36}  {'STATUS':10}  {'STAGE':8}  {'PCT':>5}  {'UPDATED':25}  TOPIC")
    for job in jobs:
        print(
            f"{job.id!s:36}  {job.status:10}  {job.current_stage or '-':8}"
            f"  {job.progress_percentage:5.1f}  {job.updated_at.isoformat()[:25]:25}"
            f"  {str(job.request.get('topic', ''))[:50]}"
        )
    return 0


def cmd_jobs_show(settings: Settings, args: argparse.Namespace) -> int:
    async def work(rt: Any) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        document = await rt.jobs.status_document(args.job_id)
        return document, await _operations(rt).history(args.job_id)

    document, history = _with_runtime(settings, work)
    if document is None:
        raise BlogpipeError(f"Job {args.job_id} not found")
    if args.json:
        print(json.dumps({**document, "operations": history}, default=str, indent=2))
        return 0
    print(
        f"Job {document['job_id']}: {document['status']} at {document['current_stage']}"
        f" ({document['progress_percentage']}%), generation {document['generation']}"
    )
    if document["error_message"]:
        print(f"Error: {document['error_message']}")
    print(
        f"\n{'STAGE':8}  {'STATUS':10}  {'GEN':>3}  {'TRIES':>5}  {'SECONDS':>8}"
        f"  {'TOKENS':>7}  ERROR"
    )
    for view in document["stages"]:
        seconds = view.get("duration_seconds")
        print(
            f"{view['stage']:8}  {view['status']:10}  {view.get('generation') or '-':>3}"
            f"  {view['attempts']:>5}  {f'{seconds:.1f}' if seconds else '-':>8}"
            f"  {view.get('tokens') or 0:>7}  {(view.get('error') or '')[:60]}"
        )
    for op in history:
        was = op.get("previous_status")
        why = _failure_before(document["progress_updates"], op["created_at"])
        print(
            f"{op['created_at']:%Y-%m-%d %H:%M:%S}  {op['action']} by {op['actor']}"
            f"{' from ' + op['from_stage'] if op['from_stage'] else ''}"
            f"{': ' + op['reason'] if op['reason'] else ''} -> generation {op['generation']}"
            + (f" (was {was}{': ' + why if was == 'failed' and why else ''})" if was else "")
        )
    return 0


def _failure_before(updates: Any, when: datetime) -> str | None:
    """What the job's last failure said before ``when`` (an operation's time): after a
    replay the stages show the new generation, and this is why the old one stopped."""
    said = None
    for update in updates if isinstance(updates, list) else []:
        if update.get("status") == "failed" and datetime.fromisoformat(update["timestamp"]) < when:
            said = update.get("details")
    return said


def _dead_letters(rt: Any) -> Any:
    from core.db.dead_letters import DeadLetterStore

    return DeadLetterStore(
        rt.store,
        max_attempts=rt.settings.max_delivery_attempts,
        max_redrives=rt.settings.max_redrives,
    )


def cmd_dlq_list(settings: Settings, args: argparse.Namespace) -> int:
    letters = _with_runtime(
        settings, lambda rt: _dead_letters(rt).recent(limit=args.limit, include_replayed=args.all)
    )
    print(f"{'ID':>6}  {'JOB ID':36}  {'STAGE':8}  {'GEN':>3}  {'TRIES':>5}  {'OUTCOME':11}  ERROR")
    for letter in letters:
        print(
            f"{letter.id:>6}  {letter.job_id!s:36}  {letter.stage:8}  {letter.generation:>3}"
            f"  {letter.attempts or '-':>5}  {letter.outcome:11}  {(letter.error or '')[:60]}"
        )
    return 0


def cmd_dlq_replay(settings: Settings, args: argparse.Namespace) -> int:
    if not args.ids and not args.all:
        raise BlogpipeError("give dead-letter IDs (see `blogpipe dlq list`) or --all")

    async def work(rt: Any) -> Any:
        return await _dead_letters(rt).replay(
            _operations(rt), args.ids or None, actor=_actor(), reason=args.reason
        )

    done, skipped = _with_runtime(settings, work)
    for result in done:
        print(
            f"Job {result.job_id} replayed from {result.from_stage}"
            f" (generation {result.generation})"
        )
    for letter_id, why in skipped.items():
        print(f"Dead letter {letter_id} skipped: {why}")
    return 0


def cmd_cleanup(settings: Settings, args: argparse.Namespace) -> int:
    from core.db.sweeper import Sweeper

    hours = args.older_than if args.older_than is not None else settings.job_retention_hours
    report = _with_runtime(
        settings,
        lambda rt: Sweeper(
            rt.store,
            stuck_after=settings.stuck_after_seconds,
            retention_hours=hours,
        ).cleanup(dry_run=args.dry_run),
    )
    verb = "Would delete" if args.dry_run else "Deleted"
    print(
        f"{verb} {report.jobs} finished job(s) older than {hours}h with {report.stage_runs}"
        f" stage run(s), {report.events} event(s), {report.deliveries} webhook delivery(ies);"
        f" {report.idempotency_keys} expired idempotency key(s)"
    )
    return 0


def register(sub: Any) -> None:
    """Add the operator commands to the ``blogpipe`` sub-command parser."""
    replay = sub.add_parser("replay", help="replay a job from a stage, or many by filter")
    replay.add_argument("job_id", nargs="?", type=_uuid, metavar="JOB_ID")
    replay.add_argument(
        "--from",
        dest="from_stage",
        choices=STAGES,
        help="stage to start from (default: where the job failed)",
    )
    replay.add_argument("--status", choices=JOB_STATUSES, help="bulk: jobs in this status")
    replay.add_argument("--stage", choices=STAGES, help="bulk: jobs stopped at this stage")
    replay.add_argument("--since", metavar="DURATION", help="bulk: updated within, e.g. 2h")
    replay.add_argument("--limit", type=int, help="bulk: replay at most this many")
    replay.add_argument("--dry-run", action="store_true", help="bulk: only count and list")
    replay.add_argument("--reason", help="why (recorded with the replay)")
    replay.set_defaults(func=cmd_replay)
    cancel = sub.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job_id", type=_uuid, metavar="JOB_ID")
    cancel.add_argument("--reason")
    cancel.set_defaults(func=cmd_cancel)
    jobs = sub.add_parser("jobs", help="list jobs or show one").add_subparsers(
        dest="jobs_command", required=True, metavar="list|show"
    )
    listing = jobs.add_parser("list", help="newest jobs first")
    listing.add_argument("--status", choices=JOB_STATUSES)
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(func=cmd_jobs_list)
    show = jobs.add_parser("show", help="one job with its stages and operations")
    show.add_argument("job_id", type=_uuid, metavar="JOB_ID")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_jobs_show)
    dlq = sub.add_parser(
        "dlq", help="stage messages that reached a dead-letter topic"
    ).add_subparsers(dest="dlq_command", required=True, metavar="list|replay")
    dlq_list = dlq.add_parser("list", help="dead letters that failed their job")
    dlq_list.add_argument("--all", action="store_true", help="include replayed and re-driven ones")
    dlq_list.add_argument("--limit", type=int, default=50)
    dlq_list.set_defaults(func=cmd_dlq_list)
    dlq_replay = dlq.add_parser("replay", help="replay the jobs of dead letters")
    dlq_replay.add_argument("ids", nargs="*", type=int, metavar="ID")
    dlq_replay.add_argument("--all", action="store_true", help="every unreplayed failure")
    dlq_replay.add_argument("--reason")
    dlq_replay.set_defaults(func=cmd_dlq_replay)
    cleanup = sub.add_parser("cleanup", help="delete finished jobs past JOB_RETENTION_HOURS")
    cleanup.add_argument("--dry-run", action="store_true")
    cleanup.add_argument(
        "--older-than",
        type=float,
        metavar="HOURS",
        help="override JOB_RETENTION_HOURS for this run",
    )
    cleanup.set_defaults(func=cmd_cleanup)
