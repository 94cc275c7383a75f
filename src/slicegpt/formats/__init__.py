"""What goes to and comes from disk: sharded safetensors, saved sliced models, GGUF."""
