"""The MixNet network as data (:mod:`.architecture`) and what is written from it and the weights: mixnet's ONNX
graph, the legacy Paddle program, the PyTorch modules, and paddleclas's own network (the reference). It imports
only :mod:`mixnet_cli.base`."""
