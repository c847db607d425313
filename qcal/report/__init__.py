"""Report stage: tables, statistics and plots from results (nothing here runs a model).

=======================  =====================================================================
module                   what it writes
=======================  =====================================================================
``tables``               result rows, Markdown / CSV / JSON tables, progress bars
``statistics``           Wilson intervals and the exact McNemar test on paired images
``sweep_tables``         a sweep's table for float32 and every variant, its plot and files
``calibration_plots``    each tensor's histogram with every method's threshold
=======================  =====================================================================
"""
