"""Conversion: the plan (from headers only), then the writers of each output layout."""
