"""`lora-convert scan`: validate (and optionally normalize) a whole registry of adapters, one JSON line each.

discover (SOURCE -> tasks) -> an executor (local.py: worker processes; ray_backend.py: Ray tasks) runs
task.run_task on each -> report.py appends each record to the JSONL report -> summary.py tabulates the report.
"""
