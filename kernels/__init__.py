"""Batched measurement kernels, written once against the Python array API.

Every function takes stacks of cutouts shaped ``(N, K, K)`` (axis 1 is y, axis 2 is x)
and per-object vectors shaped ``(N,)``, finds the array namespace with
``array_api_compat.array_namespace`` and uses only what the standard offers, so the
same code runs on NumPy, CuPy and ``array_api_strict``.

Pixel convention (LSST, astropy ``origin=0``): the centre of cutout pixel ``[n, j, i]``
is at cutout coordinates ``(x=i, y=j)``; pixel ``[n, j, i]`` covers
``[i - 0.5, i + 0.5) x [j - 0.5, j + 0.5)``. Positions ``cx, cy`` are in those
coordinates, in pixels.
"""
