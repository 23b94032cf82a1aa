"""The pipeline's hot-path statements (``core.db.pipeline``), prepared once per connection.

Each is a single statement, so it is atomic even outside a transaction: data-modifying
CTEs that all follow from one guarded update of the job row. ``Transitions`` builds the
ones that stage a message, whose SQL depends on the broker (a queue row in the same
statement, or an outbox row published after commit).
"""

from __future__ import annotations

from core.db.statements import Statement
from core.dispatch import Dispatcher

_ASYNC_COMMIT_COLUMN = ", set_config('synchronous_commit', 'off', true)"

# Stage progress events read the job's progress when they carry none of their own.
_EVENT_COLUMNS = (
    "job_id, generation, stage, stage_number, total_stages, progress_percentage, status, details"
)

# The whole claim in one statement. The job row is locked first (a concurrent replay or
# cancel is waited for, and its result seen); the skip reasons follow from it and from
# the stage's runs. Two claims racing for the same stage read the same runs (a statement
# sees the rows committed when it started), so the unique index on running runs decides:
# the loser inserts nothing and is told the stage is leased. On claim, expired runs are
# abandoned, the new run opened and progress moved. The last stage also reads each
# earlier stage's usage, for the job's result.
_CLAIM = f"""
WITH job AS (
    SELECT status, generation, request, started_at FROM jobs WHERE id = :job FOR UPDATE
), runs AS (
    SELECT id, attempt, status, lease_until > now() AS live,
        EXTRACT(EPOCH FROM lease_until - now())::float8 AS remaining
    FROM stage_runs WHERE job_id = :job AND stage = :stage AND generation = :generation
), verdict AS (
    SELECT CASE
            WHEN NOT EXISTS (SELECT 1 FROM job) THEN 'missing'
            WHEN (SELECT generation FROM job) <> :generation THEN 'stale'
            WHEN (SELECT status FROM job) <> 'processing' THEN 'not_processing'
            WHEN bool_or(status = 'succeeded') THEN 'duplicate'
            WHEN bool_or(status = 'running' AND live) THEN 'leased'
            ELSE 'claim'
        END AS verdict,
        (array_agg(remaining ORDER BY attempt DESC)
            FILTER (WHERE status = 'running' AND live))[1] AS remaining,
        COALESCE(max(attempt), 0) + 1 AS attempt
    FROM runs
), abandoned AS (
    UPDATE stage_runs SET status = 'abandoned', finished_at = now(),
        error = 'lease expired: the worker running it stopped'
    WHERE id IN (SELECT id FROM runs WHERE status = 'running') AND status = 'running'
        AND (SELECT verdict FROM verdict) = 'claim'
), run AS (
    INSERT INTO stage_runs (job_id, stage, generation, attempt, status, lease_until)
    SELECT :job, :stage, :generation, attempt, 'running', now() + make_interval(secs => :lease)
    FROM verdict WHERE verdict = 'claim'
    ON CONFLICT (job_id, stage, generation) WHERE status = 'running' DO NOTHING
    RETURNING id, attempt
), progressed AS (
    UPDATE jobs SET progress_percentage = GREATEST(progress_percentage, :pct),
        current_stage = :stage, updated_at = now()
    WHERE id = :job AND EXISTS (SELECT 1 FROM run)
), event AS (
    INSERT INTO job_events ({_EVENT_COLUMNS})
    SELECT :job, :generation, :stage, :number::int, :total::int, :pct::float8, 'started',
        format('Stage %s started (attempt %s)', :stage::text, attempt)
    FROM run
)
SELECT v.verdict, v.remaining, r.id AS run_id, r.attempt, j.request, j.started_at,
    CASE WHEN r.id IS NOT NULL THEN (
        SELECT json_object_agg(o.stage, o.output) FROM (
            SELECT DISTINCT ON (stage) stage, output FROM stage_runs
            WHERE job_id = :job AND status = 'succeeded' AND stage = ANY(:earlier::text[])
            ORDER BY stage, generation DESC, finished_at DESC) o
    ) END AS outputs,
    CASE WHEN r.id IS NOT NULL AND :final::boolean THEN (
        SELECT json_object_agg(u.stage, json_build_object(
            'provider', u.provider, 'tokens', u.tokens, 'cost', u.cost)) FROM (
            SELECT DISTINCT ON (stage) stage, provider,
                prompt_tokens + completion_tokens AS tokens, cost FROM stage_runs
            WHERE job_id = :job AND status = 'succeeded' AND stage = ANY(:earlier::text[])
            ORDER BY stage, finished_at DESC) u
    ) END AS usage{{sync}}
FROM verdict v LEFT JOIN run r ON true LEFT JOIN job j ON true"""

JOB_STATE = "SELECT status, generation FROM jobs WHERE id = $1"

PROGRESS = Statement(f"""
WITH lease AS (
    UPDATE stage_runs SET lease_until = now() + make_interval(secs => :lease)
    WHERE id = :run AND status = 'running'
), job AS (
    UPDATE jobs SET progress_percentage = GREATEST(progress_percentage, :pct),
        current_stage = :stage, updated_at = now()
    WHERE id = :job AND generation = :generation AND status = 'processing'
    RETURNING id
)
INSERT INTO job_events ({_EVENT_COLUMNS})
SELECT :job, :generation, :stage, :number::int, :total::int, :pct::float8, 'in_progress',
    :details::text
FROM job""")

HEARTBEAT = Statement(
    "UPDATE stage_runs SET lease_until = now() + make_interval(secs => :lease)"
    " WHERE id = :run AND status = 'running'"
)

RECORD_FAILURE = Statement(
    "UPDATE stage_runs SET status = 'failed', error = :error, error_type = :type,"
    " prompt_tokens = :pt, completion_tokens = :ct, cost = :cost, finished_at = now(),"
    " lease_until = NULL WHERE id = :run"
)

# The run's outcome, given whether the job update (``job``) found the job still current.
_RUN_OUTCOME = """
succeeded AS (
    UPDATE stage_runs SET status = 'succeeded', output = :output, provider = :provider,
        model = :model, prompt_tokens = :pt, completion_tokens = :ct, cost = :cost,
        finished_at = now(), lease_until = NULL
    WHERE id = :run AND EXISTS (SELECT 1 FROM job)
), discarded AS (
    UPDATE stage_runs SET status = 'discarded', finished_at = now(),
        error = 'job was replayed or cancelled while this stage ran'
    WHERE id = :run AND NOT EXISTS (SELECT 1 FROM job)
)"""


def _open_run(stage: str) -> str:
    """The CTE ``next_run``: the first run of the stage named by parameter ``:<stage>``,
    opened for the holder of its message, unless that stage already has a run at this
    generation (then nothing is opened and its delivery claims as usual)."""
    return f"""next_run AS (
    INSERT INTO stage_runs (job_id, stage, generation, attempt, status, lease_until)
    SELECT :job, :{stage}, :generation, 1, 'running', now() + make_interval(secs => :lease)
    FROM job
    WHERE NOT EXISTS (SELECT 1 FROM stage_runs
        WHERE job_id = :job AND stage = :{stage} AND generation = :generation)
    ON CONFLICT (job_id, stage, generation) WHERE status = 'running' DO NOTHING
    RETURNING id
)"""


class Transitions:
    """The statements that stage a message, for one dispatcher."""

    def __init__(self, dispatcher: Dispatcher, *, asynchronous_commit: bool) -> None:
        sync = _ASYNC_COMMIT_COLUMN if asynchronous_commit else ""
        staged = dispatcher.staging("staged", "EXISTS (SELECT 1 FROM job)", "next")
        # What every statement that stages a message returns about it (``Dispatcher.staging``).
        handed = (
            "(SELECT max(outbox_id) FROM staged) AS outbox_id,"
            f" (SELECT max(held_id) FROM staged) AS held_id{sync}"
        )
        self.claim = Statement(_CLAIM.replace("{sync}", sync))
        # A queued job moves to processing at the generation its message names (checked
        # in the update, so a job that is not queued at that generation is left alone).
        self.start = Statement(f"""
WITH job AS (
    UPDATE jobs SET status = 'processing', started_at = now(), updated_at = now(),
        current_stage = :stage
    WHERE id = :job AND status IN ('queued', 'pending') AND generation = :generation
    RETURNING id
), {staged}
SELECT EXISTS (SELECT 1 FROM job) AS started,
    {handed}""")
        # The same, when a consumer in this process holds the first stage's message: the
        # first stage's run is opened too (as in ``complete_claim``).
        self.start_claim = Statement(f"""
WITH job AS (
    UPDATE jobs SET status = 'processing', started_at = now(), updated_at = now(),
        current_stage = :stage, progress_percentage = GREATEST(progress_percentage, :next_pct)
    WHERE id = :job AND status IN ('queued', 'pending') AND generation = :generation
    RETURNING id, request, started_at
), {_open_run("stage")}, event AS (
    INSERT INTO job_events ({_EVENT_COLUMNS})
    SELECT :job, :generation, :stage, :next_number::int, :total::int, :next_pct::float8,
        'started', format('Stage %s started (attempt 1)', :stage::text)
    FROM next_run
), {staged}
SELECT EXISTS (SELECT 1 FROM job) AS started,
    (SELECT id FROM next_run) AS next_run_id,
    (SELECT request FROM job) AS request,
    (SELECT started_at FROM job) AS started_at,
    {handed}""")
        # A stage that hands off to the next one.
        self.complete = Statement(f"""
WITH job AS (
    UPDATE jobs SET progress_percentage = GREATEST(progress_percentage, :pct),
        current_stage = :stage, updated_at = now()
    WHERE id = :job AND generation = :generation AND status = 'processing'
    RETURNING id
), {_RUN_OUTCOME}, event AS (
    INSERT INTO job_events ({_EVENT_COLUMNS})
    SELECT :job, :generation, :stage, :number::int, :total::int, :pct::float8, 'completed',
        format('Stage %s completed', :stage::text)
    FROM job
), {staged}
SELECT EXISTS (SELECT 1 FROM job) AS committed,
    {handed}""")
        # A stage that hands off to the next one held by a consumer in this process (see
        # ``Dispatcher.hold``), and opens the next stage's run for it: that stage then starts
        # without a claim. Only when the next stage has no run at this generation yet (the
        # usual case); otherwise nothing is opened and its delivery claims as usual.
        self.complete_claim = Statement(f"""
WITH job AS (
    UPDATE jobs SET progress_percentage = GREATEST(progress_percentage, :next_pct),
        current_stage = :next_stage, updated_at = now()
    WHERE id = :job AND generation = :generation AND status = 'processing'
    RETURNING id
), {_RUN_OUTCOME}, {_open_run("next_stage")}, event AS (
    INSERT INTO job_events ({_EVENT_COLUMNS})
    SELECT :job, :generation, e.stage, e.number, :total::int, e.pct, e.status, e.details
    FROM job, (VALUES
        (1, :stage::text, :number::int, :pct::float8, 'completed',
            format('Stage %s completed', :stage::text)),
        (2, :next_stage::text, :next_number::int, :next_pct::float8, 'started',
            format('Stage %s started (attempt 1)', :next_stage::text)))
        AS e(n, stage, number, pct, status, details)
    WHERE e.n = 1 OR EXISTS (SELECT 1 FROM next_run)
    ORDER BY e.n
), {staged}
SELECT EXISTS (SELECT 1 FROM job) AS committed,
    (SELECT id FROM next_run) AS next_run_id,
    {handed}""")
        # The last stage: the job completes with its result, and ``job.completed`` goes out.
        self.finish = Statement(f"""
WITH job AS (
    UPDATE jobs SET status = 'completed', progress_percentage = 100,
        current_stage = 'completed', result = :result, completed_at = now(),
        updated_at = now(), error_message = NULL, error = NULL
    WHERE id = :job AND generation = :generation AND status = 'processing'
    RETURNING id
), {_RUN_OUTCOME}, event AS (
    INSERT INTO job_events ({_EVENT_COLUMNS})
    SELECT :job, :generation, e.stage, e.number, :total::int, 100, 'completed', e.details
    FROM job, (VALUES (1, :stage::text, :number::int, format('Stage %s completed', :stage::text)),
        (2, 'completed', :total::int, 'Blog generation completed'))
        AS e(n, stage, number, details)
    ORDER BY e.n
), {staged}
SELECT EXISTS (SELECT 1 FROM job) AS committed,
    {handed}""")
        self.fail = Statement(f"""
WITH job AS (
    UPDATE jobs SET status = 'failed', current_stage = :stage, error_message = :message,
        error = :details, completed_at = now(), updated_at = now()
    WHERE id = :job AND generation = :generation AND status = 'processing'
    RETURNING id, progress_percentage
), event AS (
    INSERT INTO job_events ({_EVENT_COLUMNS})
    SELECT :job, :generation, :stage, :number::int, :total::int, progress_percentage, 'failed',
        :message::text
    FROM job
), {staged}
SELECT EXISTS (SELECT 1 FROM job) AS committed,
    {handed}""")
