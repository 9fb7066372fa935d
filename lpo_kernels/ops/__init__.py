"""Triton ops: one file per op (kernels, launchers and entry point together)."""
