"""The pipeline stage: one adapter prepared once (prepared.py) and every command as its steps in order (commands.py)."""
