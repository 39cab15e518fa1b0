"""recon-server: scanner-side inline MRI reconstruction (ISMRMRD in, DPS, DICOM to the PACS)."""

__version__ = "0.1.0"
