"""Reading and writing: where an adapter comes from, safetensors headers and lazy reads, the streaming writer."""
