"""Data files shipped with lorafit (the identity data set of `lorafit demo`)."""
