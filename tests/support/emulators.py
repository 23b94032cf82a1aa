"""Fixtures that start the Google emulators on free ports (filled in by the emulator work)."""
