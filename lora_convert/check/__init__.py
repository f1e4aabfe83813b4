"""validate and inspect: every check on one adapter, reported as findings."""
