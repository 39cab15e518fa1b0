"""Data: masks, brain simulator, fastMRI and ISMRMRD file I/O, training slices."""
