"""Fidelity evaluation of KV compression methods: perplexity and passkey retrieval."""
