"""
The table runner behind scripts/reproduce.py: table rows from the configs, launching the samplers, scoring a row and
the results table.
"""
