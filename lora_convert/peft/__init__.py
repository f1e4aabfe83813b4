"""PEFT's side: key grammar, adapter_config.json semantics, the adapter model, PEFT's reference delta."""
