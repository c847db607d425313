"""Drivers: compose the stages. Stages never import a driver.

==================  ==========================================================================
module              what it drives
==================  ==========================================================================
``session``         one model: load -> import -> calibrate -> quantize -> compile -> evaluate
``sweep``           every variant of a config, resumable, into one output folder
``sweep_config``    a sweep's YAML file, checked completely before any work
==================  ==========================================================================
"""
