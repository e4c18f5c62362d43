"""The C++ sources of the native CPU kernels, shipped as package data (installed as ``marginops._csrc``).

They are compiled on first use by :func:`marginops.backends.native.load`; nothing here is imported.
"""
