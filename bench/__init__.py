"""The benchmark harness: blogpipe side by side with a Celery peer and the database's ceiling.

``python -m bench`` (``make bench``) runs the scenarios of issue 6, writes
``bench/results/latest.json`` and prints a table. See ``bench/results/README.md``.
"""
