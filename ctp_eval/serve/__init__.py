"""Serving a model with its prompt: vLLM's own OpenAI-compatible server, and the request that carries the prompt."""
