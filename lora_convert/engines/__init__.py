"""Serving engines: one rule file per engine release, the feature detectors its rules fire on, the generated tables."""
