"""validate and inspect: every check on one adapter, reported as findings.

`validate.py` runs the checks, one module per check family (config, keys, pairs, shapes, moe, data, sharding,
smoke, engine), each a `context.Check` that returns its findings and whether it ran; `base.py` resolves the base
model once for all of them; `report.py` holds the report and its verdict.
"""
