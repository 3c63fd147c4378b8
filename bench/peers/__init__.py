"""The systems measured side by side; each runs in its own worker process (see `worker`)."""
