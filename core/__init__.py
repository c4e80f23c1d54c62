"""kvpipe: extract image keys/values of multimodal LMs once, probe them many times."""

__version__ = "0.1.0"
