"""Shipped base-model configs, one JSON file per model: what `--base NAME` means, and the stand-in for a Hub base
that cannot be fetched."""
