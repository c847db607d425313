"""Calibrate stage: one statistics pass per model, then every method's activation ranges.

==============  ==============================================================================
module          what it does
==============  ==============================================================================
``sources``     where the pass reads every tensor's float values (the numpy interpreter)
``collect``     the pass: per-tensor abs-max, min/max, zero count and |x| histogram
``methods``     the range maths, one function per method, chosen from a registry
``result``      the statistics plus every method's ranges, saved to and loaded from a file
==============  ==============================================================================
"""
