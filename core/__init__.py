"""blogpipe core: settings, schema, repositories, ports and adapters.

Imports nothing else of ours."""
