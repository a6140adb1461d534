"""The foundation: the cache root and every path under it, atomic file writes and hashing, locks, the
weights manifest, every ``MIXNET_*`` setting, the errors, the one HTTP layer, and importing heavy libraries without
their side effects. It imports nothing else of mixnet_cli."""
