"""Network pieces shared by the tasks: noise embeddings, attention, the AdaLN-Zero layer."""

from .attention import HAS_FLASH_ATTN, SelfAttention, attention
from .embedding import LabelEmbedding, SigmaEmbedding, sinusoidal_embedding
from .layers import AdaLNFinalLayer, AdaLNZeroLayer, Mlp, init_linears_, set_kernels

__all__ = [
    "HAS_FLASH_ATTN",
    "SelfAttention",
    "attention",
    "LabelEmbedding",
    "SigmaEmbedding",
    "sinusoidal_embedding",
    "AdaLNFinalLayer",
    "AdaLNZeroLayer",
    "Mlp",
    "init_linears_",
    "set_kernels",
]
