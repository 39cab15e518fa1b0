"""DICOM: MR image writer, durable spool, C-STORE sender."""
