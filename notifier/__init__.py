"""Webhook delivery: signing, retry schedule, attempt log, redelivery."""
