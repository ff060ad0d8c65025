"""The rollout engine: the only place where sampling math lives."""
