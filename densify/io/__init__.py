"""Files in and out: image sources and decoding (images), intrinsics and the exact pixel mappings of a
profile (cameras), output names, ids and fingerprints (layout), atomic writers (outputs), previews,
progress, and redaction of credentials from outside text.

The ground floor: imports only numpy, OpenCV, Pillow, pyarrow and densify.config.
"""
