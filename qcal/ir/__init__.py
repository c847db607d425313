"""The intermediate representations every stage after import works on (no stage logic here).

==============  ==============================================================================
module          what it defines
==============  ==============================================================================
``graph``       the float ``Graph`` (imported model, BatchNorm folded) and its op set
``qgraph``      the integer ``QGraph`` realize produces: value model, op table, bounds
``shapes``      the shape rule of every float op, defined once
==============  ==============================================================================
"""
