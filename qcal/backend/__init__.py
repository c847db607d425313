"""Backends that compile and run qcal's graphs. Only ``qcal.backend.tvm`` imports TVM."""
