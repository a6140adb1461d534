"""Weights into the cache, verified: downloads (mirrors, resume, retries, checksums), your own files, and the
safe ``.pdparams`` reader. It imports :mod:`mixnet_cli.base` and :mod:`mixnet_cli.network` (to check a state dict
against the architecture)."""
