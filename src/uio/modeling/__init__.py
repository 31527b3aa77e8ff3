"""The Unified-IO network (layers, position biases, stacks) and its decoding routines."""
from uio.modeling.generation import GenerationOutput, generate, score_options
from uio.modeling.network import Decoder, Encoder, EncoderOutput, UnifiedIONetwork

__all__ = ["UnifiedIONetwork", "Encoder", "Decoder", "EncoderOutput", "GenerationOutput", "generate",
           "score_options"]
