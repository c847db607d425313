"""Compile stage, TVM: the only package of qcal that imports ``tvm``.

==============  ==============================================================================
module          what it does
==============  ==============================================================================
``emit``        a ``QGraph`` becomes a Relax module; targets, builds, the VM
``schedules``   CPU schedules for the PrimFuncs the Relax module lowers to (int16-pair convs)
``compile``     a graph becomes a batched executable, through a self-keyed on-disk cache
``histogram``   the calibration pass's |x| histogram as a TIR kernel
==============  ==============================================================================
"""
