"""`ossrt serve`: an OpenAI-compatible HTTP server (the `serve` extra)."""
