-- The teacher finished on its own (not cut off by max_tokens, not filtered by the provider).
finish_reason = 'stop'
