"""Numerical reconstruction core: FFTs, SENSE operator, coil maps, prewhitening, classical solvers,
diffusion posterior samplers (``dps``), the volume engine and the method registry."""
