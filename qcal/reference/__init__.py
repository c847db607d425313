"""Numpy references: the semantics the TVM backend must reproduce, written for obviousness.

======================  ========================================================================
module                  what it runs
======================  ========================================================================
``kernels``             conv, dense and pooling on numpy arrays, exact for integers
``float_interpreter``   the float semantics of every op (defined once) and the float ``Graph``
``int_interpreter``     the integer ``QGraph`` bit for bit, and its fake-quantized simulation
======================  ========================================================================
"""
