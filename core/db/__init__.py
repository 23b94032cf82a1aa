"""PostgreSQL: schema, engine, and the repositories that hide SQL from everything else."""
