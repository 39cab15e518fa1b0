"""Numerical reconstruction core: FFTs, SENSE operator, coil maps, prewhitening, solvers."""
