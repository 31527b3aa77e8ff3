"""Image tokenizers: the interface, the registry and the taming-compatible VQ-GAN."""
from uio.image_tokenizer.base import (
    ImageTokenizer,
    available_image_tokenizers,
    build_image_tokenizer,
    register_image_tokenizer,
)
from uio.image_tokenizer.vqgan import CONFIGS, VQGAN, VQGANConfig, get_config

__all__ = ["ImageTokenizer", "build_image_tokenizer", "register_image_tokenizer", "available_image_tokenizers",
           "VQGAN", "VQGANConfig", "CONFIGS", "get_config"]
