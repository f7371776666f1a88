"""Wire codecs: bytes <-> dicts only (no sockets, no threads).

``gr00t``: GR00T's msgpack + NPY encoding; ``openpi``: openpi-client's msgpack-numpy; ``openpi_keys``:
openpi's flat keys <-> the policy's GR00T modality keys.
"""
