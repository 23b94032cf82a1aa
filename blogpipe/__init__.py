"""The thin CLI that wires core, api, stages and notifier into deployables."""
