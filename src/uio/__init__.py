__version__ = "0.1.0"

from uio.image_tokenizer import VQGAN, ImageTokenizer  # noqa: E402
