"""Thin job scripts, one per stage; importable as ``jungletrap.jobs``."""
