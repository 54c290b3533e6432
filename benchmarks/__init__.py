"""Benchmark scripts (`python -m benchmarks.NAME`); each prints a table.

Importing the package re-executes the process under jaxstar's caching malloc, as the launcher
does (`jaxstar/allocator.py`; JAXSTAR_ALLOCATOR=off keeps glibc's).
"""
from jaxstar import allocator

allocator.ensure()
