"""lgsae: sparse autoencoders for every layer of a language model, one per group of layers."""

from lgsae.sae import ForwardOutput, GroupSAE

__version__ = "0.1.0"
__all__ = ["ForwardOutput", "GroupSAE", "__version__"]
