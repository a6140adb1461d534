"""Images in: turning arguments into inputs, decoding exactly as PaddleClas does, its preprocessing,
softmax, and the label lists. It imports only :mod:`mixnet_cli.base`."""
