"""The notifier's hot-path statements (``core.db.webhooks``), prepared once per connection.

Each step of a delivery is one statement, atomic on its own: storing it (with the
endpoint row it needs and the progress deliveries it supersedes), claiming due ones
(with their endpoint's secrets), and settling an attempt (with the attempt log and the
endpoint's health).
"""

from __future__ import annotations

from core.db.jobs import STATUS_QUERY
from core.db.statements import Statement

DELIVERY_COLUMNS = (
    "id, job_id, tenant, event_id, event_type, url, payload, status, attempt_count,"
    " next_attempt_at, last_status_code, last_error, created_at, updated_at, delivered_at,"
    " occurred_at, trigger"
)
ATTEMPT_COLUMNS = (
    "id, delivery_id, attempt, trigger, url, status_code, latency_ms, error, response_excerpt,"
    " created_at"
)
ENDPOINT_COLUMNS = (
    "tenant, url, status, consecutive_failures, failing_since, disabled_at, disabled_reason,"
    " secret, previous_secret, previous_secret_expires_at"
)
SECRET_COLUMNS = ("secret", "previous_secret", "previous_secret_expires_at")
# A new delivery's payload is the one its caller passed in: not read back.
_INSERTED_COLUMNS = DELIVERY_COLUMNS.replace(" payload,", " NULL::json AS payload,")
assert _INSERTED_COLUMNS != DELIVERY_COLUMNS

# The job an event is about, with everything its status document needs; one row always
# (all null when the job is gone), so that concurrent reads can be sent together.
EVENT_JOB = Statement(
    f"SELECT q.* FROM (SELECT 1) AS one LEFT JOIN ({STATUS_QUERY}) AS q ON true", read=True
)

# Stores a delivery once per event. The endpoint row is created if missing, else
# share-locked, so a concurrent disable is ordered before or after this, never in between.
# A progress event older than another delivery of its job is stored as skipped; a new
# delivery skips the unsent progress deliveries before it. With ``:send_now``, a delivery
# that nothing of its job and endpoint waits before is stored already claimed for its
# first attempt (as ``CLAIM`` would), with the secrets to sign it. Its one row is all
# null when a concurrent handler stored the event first (it is not in this statement's
# snapshot); one row always, so that concurrent stores can be sent together. A delivery it
# stores comes back with a null payload (the caller has it); an existing one with its own.
CREATE = Statement(f"""
WITH existing AS (
    SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE id = :id
), endpoint AS (
    SELECT status, {", ".join(SECRET_COLUMNS)} FROM webhook_endpoints
    WHERE tenant = :tenant AND url = :url FOR SHARE
), new_endpoint AS (
    INSERT INTO webhook_endpoints (tenant, url)
    SELECT :tenant::text, :url::text WHERE NOT EXISTS (SELECT 1 FROM endpoint)
    ON CONFLICT (tenant, url) DO NOTHING
), verdict AS (
    SELECT CASE
            WHEN :event_type = 'job.progress' AND EXISTS (
                SELECT 1 FROM webhook_deliveries WHERE job_id = :job_id AND url = :url
                AND occurred_at > :occurred_at) THEN 'skipped'
            WHEN EXISTS (SELECT 1 FROM endpoint WHERE status = 'disabled') THEN 'held'
            WHEN :send_now::boolean AND NOT EXISTS (
                SELECT 1 FROM webhook_deliveries WHERE job_id = :job_id AND url = :url
                AND status IN ('pending', 'sending', 'held')) THEN 'sending'
            ELSE 'pending'
        END AS status
    WHERE NOT EXISTS (SELECT 1 FROM existing)
), inserted AS (
    INSERT INTO webhook_deliveries (id, job_id, tenant, event_id, event_type, url, payload,
        status, attempt_count, next_attempt_at, occurred_at, last_error)
    SELECT :id::uuid, :job_id::uuid, :tenant::text, :event_id::text, :event_type::text,
        :url::text, :payload::json, status, CASE WHEN status = 'sending' THEN 1 ELSE 0 END,
        CASE WHEN status = 'pending' THEN now()
            WHEN status = 'sending' THEN now() + make_interval(secs => :lease) END,
        :occurred_at::timestamptz,
        CASE WHEN status = 'skipped' THEN 'superseded by a later event' END
    FROM verdict
    -- No conflict target: the id and the event id are both unique, and a concurrent
    -- insert of the same event may hit either first.
    ON CONFLICT DO NOTHING
    RETURNING {_INSERTED_COLUMNS}
), superseded AS (
    UPDATE webhook_deliveries SET status = 'skipped', next_attempt_at = NULL,
        last_error = 'superseded by a later event', updated_at = now()
    WHERE id IN (SELECT id FROM webhook_deliveries WHERE job_id = :job_id AND url = :url
        AND event_type = 'job.progress' AND status IN ('pending', 'held')
        AND occurred_at <= :occurred_at AND id <> :id FOR UPDATE SKIP LOCKED)
    AND EXISTS (SELECT 1 FROM inserted)
), answer AS (
    SELECT i.*, true AS created, {", ".join(f"e.{name}" for name in SECRET_COLUMNS)}
    FROM inserted i LEFT JOIN endpoint e ON true
    UNION ALL
    SELECT *, false AS created, NULL, NULL, NULL FROM existing
)
SELECT a.* FROM (SELECT 1) AS one LEFT JOIN answer a ON true""")

# Claims due deliveries for one attempt each, for a lease (see ``claim_due``), and reads
# the secrets their endpoints sign with. When it claims nothing, its one row (delivery
# columns null) says in how many seconds the earliest pending or leased delivery is due.
CLAIM = Statement(f"""
WITH due AS (
    SELECT EXTRACT(EPOCH FROM min(next_attempt_at) - now())::float8 AS due_in
    FROM webhook_deliveries WHERE status IN ('pending', 'sending')
), claimed AS (
    UPDATE webhook_deliveries d SET status = 'sending',
        attempt_count = d.attempt_count + 1, updated_at = now(),
        next_attempt_at = now() + make_interval(secs => :lease)
    WHERE d.id IN (SELECT c.id FROM webhook_deliveries c
        WHERE c.status IN ('pending', 'sending') AND c.next_attempt_at <= now()
        AND NOT EXISTS (SELECT 1 FROM webhook_deliveries e WHERE e.job_id = c.job_id
            AND e.url = c.url AND e.status IN ('pending', 'sending', 'held')
            AND (e.occurred_at, e.created_at, e.id) < (c.occurred_at, c.created_at, c.id))
        -- A disabled endpoint gets only the attempts an operator asks for.
        AND (c.trigger <> 'schedule' OR NOT EXISTS (SELECT 1 FROM webhook_endpoints w
            WHERE w.tenant = c.tenant AND w.url = c.url AND w.status = 'disabled'))
        ORDER BY c.next_attempt_at LIMIT :limit FOR UPDATE OF c SKIP LOCKED)
    RETURNING {DELIVERY_COLUMNS}
)
SELECT c.*, {", ".join(f"w.{name}" for name in SECRET_COLUMNS)}, due.due_in
FROM due LEFT JOIN (claimed c LEFT JOIN webhook_endpoints w
    ON w.tenant = c.tenant AND w.url = c.url) ON true
ORDER BY c.occurred_at, c.created_at""")

# Settles the attempt ``:attempt`` of a delivery, unless its lease was lost: logs it, and
# counts it for or against the endpoint (``:health`` is success, failure or none). The
# row says whether it was recorded and, after a failure, the endpoint's health.
SETTLE = Statement(f"""
WITH settled AS (
    UPDATE webhook_deliveries SET status = :status, updated_at = now(),
        last_status_code = :code, last_error = :error,
        next_attempt_at = CASE WHEN :status = 'pending'
            THEN now() + make_interval(secs => :retry_in) END,
        delivered_at = CASE WHEN :status = 'succeeded' THEN now() ELSE delivered_at END,
        trigger = CASE WHEN :status = 'pending' THEN trigger ELSE 'schedule' END
    WHERE id = :id AND status = 'sending' AND attempt_count = :attempt
    RETURNING id
), logged AS (
    INSERT INTO webhook_attempts (delivery_id, attempt, trigger, url, status_code,
        latency_ms, error, response_excerpt)
    SELECT id, :attempt, :trigger::text, :attempt_url::text, :code, :latency_ms::float8, :error,
        :excerpt::text
    FROM settled
), recovered AS (
    UPDATE webhook_endpoints SET consecutive_failures = 0, failing_since = NULL,
        updated_at = now()
    WHERE tenant = :tenant AND url = :url AND :health = 'success'
        AND (consecutive_failures <> 0 OR failing_since IS NOT NULL)
        AND EXISTS (SELECT 1 FROM settled)
), failing AS (
    INSERT INTO webhook_endpoints AS w (tenant, url, consecutive_failures, failing_since)
    SELECT :tenant::text, :url::text, 1, now() FROM settled WHERE :health = 'failure'
    ON CONFLICT (tenant, url) DO UPDATE SET updated_at = now(),
        consecutive_failures = w.consecutive_failures + 1,
        failing_since = coalesce(w.failing_since, now())
    RETURNING {ENDPOINT_COLUMNS}
)
SELECT EXISTS (SELECT 1 FROM settled) AS recorded, failing.*
FROM (SELECT 1) AS one LEFT JOIN failing ON true""")
