"""``mixnet serve``: the HTTP service and its dynamic batcher, and the client of ``classify --server``. It
imports everything below it and the API (:mod:`mixnet_cli.classifier`), never the command line."""
