"""The model: configuration, the layers of one block, the block and the model, KV cache, expert toggles, generation."""
