"""Exports that real runtimes load."""
