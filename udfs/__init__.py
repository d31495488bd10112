"""Partition functions (UDFs) handed to Dask; importable on workers as ``jungletrap.udfs``."""
