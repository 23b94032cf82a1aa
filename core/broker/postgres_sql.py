"""The ``postgres`` broker's statements: ``core.broker.postgres`` publishes with them,
``core.broker.postgres_consumer`` leases and settles."""

UPSERT_SUBSCRIPTION = """
INSERT INTO broker_subscriptions (name, topic, max_delivery_attempts, dead_letter_topic,
    ack_deadline_seconds, min_backoff_seconds, max_backoff_seconds)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (name) DO UPDATE SET topic = EXCLUDED.topic,
    max_delivery_attempts = EXCLUDED.max_delivery_attempts,
    dead_letter_topic = EXCLUDED.dead_letter_topic,
    ack_deadline_seconds = EXCLUDED.ack_deadline_seconds,
    min_backoff_seconds = EXCLUDED.min_backoff_seconds,
    max_backoff_seconds = EXCLUDED.max_backoff_seconds"""
# Publishes of any topics in one statement; ids are drawn in the CTE so each input message
# maps to the rows it fanned out to (none when its topic has no subscriptions).
PUBLISH_MANY = """
WITH fanned AS (
    SELECT m.n, s.name, m.data, m.attributes,
        nextval(pg_get_serial_sequence('broker_messages', 'id')) AS id
    FROM unnest($1::text[], $2::bytea[], $3::text[])
        WITH ORDINALITY AS m(topic, data, attributes, n)
    JOIN broker_subscriptions s ON s.topic = m.topic ORDER BY m.n, s.name
), inserted AS (
    INSERT INTO broker_messages (id, subscription, data, attributes)
    SELECT id, name, data, attributes::jsonb FROM fanned
)
SELECT n, min(id) FROM fanned GROUP BY n"""
SUBSCRIPTION = """
SELECT name, topic, max_delivery_attempts, dead_letter_topic, ack_deadline_seconds,
    min_backoff_seconds, max_backoff_seconds FROM broker_subscriptions WHERE name = $1"""
LEASE = """
WITH next AS (
    SELECT id FROM broker_messages
    WHERE subscription = $1 AND available_at <= now()
    ORDER BY available_at, id LIMIT $2 FOR UPDATE SKIP LOCKED
)
UPDATE broker_messages m
SET attempts = m.attempts + 1, available_at = now() + make_interval(secs => $3)
FROM next WHERE m.id = next.id
RETURNING m.id, m.data, m.attributes::text, m.attempts"""
NEXT_DUE = """
SELECT extract(epoch FROM min(available_at) - clock_timestamp())::float8
FROM broker_messages WHERE subscription = $1"""
# An ack counts even after its lease expired: the work is done, a redelivery would be waste.
ACK = "DELETE FROM broker_messages WHERE id = ANY($1::bigint[])"
# Nack, lease extension and release on shutdown. ``attempts`` fences out a stale lease:
# once a lease expired and the row was delivered again, the old holder cannot move it.
DELAY = """
UPDATE broker_messages m SET available_at = now() + make_interval(secs => d.delay)
FROM unnest($1::bigint[], $2::int[], $3::float8[]) AS d(id, attempts, delay)
WHERE m.id = d.id AND m.attempts = d.attempts"""
# Delete and re-publish to the dead-letter topic's subscriptions in one statement;
# with no dead-letter topic ($5 NULL) the message is only deleted.
DEAD_LETTER = """
WITH gone AS (
    DELETE FROM broker_messages m
    USING unnest($1::bigint[], $2::int[], $3::int[]) AS d(id, attempts, delivered)
    WHERE m.id = d.id AND m.attempts = d.attempts
    RETURNING m.id, m.data, m.attributes, d.delivered
)
INSERT INTO broker_messages (subscription, data, attributes)
SELECT s.name, g.data, g.attributes || jsonb_build_object('x-dead-letter-source', $4::text,
    'x-delivery-attempts', g.delivered::text, 'x-original-message-id', g.id::text)
FROM gone g JOIN broker_subscriptions s ON s.topic = $5 ORDER BY g.id, s.name"""
