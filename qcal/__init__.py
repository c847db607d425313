"""qcal: int8 post-training quantization research through Apache TVM."""

__version__ = "0.1.0"
