"""File -> catalog: the measurement library (no web code, no service settings).

The data path, one module per stage::

    exposure (FITS, LSST afw or plain) -> objects (DiaObject table) -> selection (WCS, Box2D)
    -> psf_models (stamps per object) -> cutouts (row-band staging, (N, K, K) stacks)
    -> runner (the kernels on one backend) -> measure (the whole path) -> catalog (Arrow
    table, DiaForcedSource schema) -> formats (parquet, CSV, JSON)
"""
