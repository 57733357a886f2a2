"""`cladapt serve` presets (package data): ``default.yaml`` holds the server's defaults."""
