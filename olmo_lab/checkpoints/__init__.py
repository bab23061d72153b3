"""Hugging Face checkpoints and tokenizers: reading and writing them safely, the hub, comparing with transformers."""
