"""Run presets (package data): ``default.yaml`` and named presets for ``--config NAME``."""
