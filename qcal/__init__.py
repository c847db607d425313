"""qcal: int8 post-training quantization research through Apache TVM."""
import os

__version__ = "0.1.0"

# TVM's thread pool, when it first starts, pins the calling thread (Python's main thread) to one
# core, and every thread started from it afterwards inherits that mask: MXNet's engine and OpenMP
# workers then share one core with Python. qcal runs MXNet, numpy and TVM in one process (the
# calibration pass overlaps MXNet's forward with histogramming on the main thread), so TVM is
# asked not to pin; a value the user set is kept.
os.environ.setdefault("TVM_BIND_THREADS", "0")
