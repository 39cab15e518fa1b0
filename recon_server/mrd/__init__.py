"""ISMRMRD streaming: wire codec, scan assembly, stream server, Gadgetron gadget, replay."""
