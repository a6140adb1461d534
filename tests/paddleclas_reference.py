"""PaddleClas's own pipeline, as an independent reference: its deploy preprocessing operators on the file bytes
(cv2 decoding), its dygraph network with weights loaded by its own loader, and its Topk post-processing.
Nothing here uses mixnet_cli, so a mistake in mixnet_cli cannot hide in the reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TOLERANCE = 1e-4
TOPK = 5
# PaddleClas's evaluation transform for MixNet (ppcls/configs/ImageNet/MixNet/MixNet_*.yaml), written out here
# rather than read from our manifest, so that a wrong manifest fails these tests.
RESIZE_SHORT = 256
CROP_SIZE = 224
SCALE = "1.0/255.0"
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def paddleclas_decode(path: Path) -> np.ndarray:
    """PaddleClas's DecodeImage (cv2.imdecode, BGR to RGB) on the file's bytes.

    cv2 cannot decode GIF; PaddleClas would fail there, so for GIF the reference is Pillow's first frame as RGB.
    """
    from paddleclas.deploy.python.preprocess import DecodeImage

    if path.suffix.lower() == ".gif":
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    return DecodeImage(to_rgb=True, channel_first=False)(path.read_bytes())


def paddleclas_transform(rgb: np.ndarray, resize_backend: str = "cv2") -> np.ndarray:
    """PaddleClas's ResizeImage, CropImage, NormalizeImage (HWC) and ToCHWImage, in the config's order."""
    from paddleclas.deploy.python.preprocess import CropImage, NormalizeImage, ResizeImage, ToCHWImage

    operators = [
        ResizeImage(resize_short=RESIZE_SHORT, backend=resize_backend),
        CropImage(size=CROP_SIZE),
        NormalizeImage(scale=SCALE, mean=MEAN, std=STD, order=""),
        ToCHWImage(),
    ]
    image = rgb
    for operator in operators:
        image = operator(image)
    return image


class PaddleClasReference:
    """PaddleClas's dygraph network with the weights loaded by PaddleClas's own loader, and its post-processing."""

    def __init__(self, model_name: str, weights: Path) -> None:
        import paddle
        from paddleclas.ppcls.arch.backbone.model_zoo import mixnet
        from paddleclas.ppcls.utils.save_load import load_dygraph_pretrain

        self._paddle = paddle
        self.network = getattr(mixnet, model_name)(pretrained=False, class_num=1000)
        load_dygraph_pretrain(self.network, str(weights))  # paddle.load + set_dict
        self.network.eval()

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        paddle = self._paddle
        with paddle.no_grad():
            logits = self.network(paddle.to_tensor(np.ascontiguousarray(batch, dtype=np.float32)))
            return paddle.nn.functional.softmax(logits, axis=-1).numpy()

    def answer(self, array: np.ndarray) -> tuple[list[int], np.ndarray]:
        """Top-k class ids in PaddleClas's order (its Topk post-processing) and the full probability row."""
        from paddleclas.deploy.python.postprocess import Topk

        probabilities = self.probabilities(array[None])
        return Topk(topk=TOPK)(probabilities)[0]["class_ids"], probabilities[0]
