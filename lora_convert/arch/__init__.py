"""The base model's side: architecture schemas, their expression language, base configs and presets, the shape check."""
