"""DeepSpeed presets: zero2.json (adapters on a frozen base), zero3.json (refused by cladapt train today)."""
