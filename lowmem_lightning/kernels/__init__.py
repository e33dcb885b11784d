"""Triton kernels, each beside its pure-PyTorch reference and launcher (one family per file).

This layer knows nothing about optimizers' bookkeeping or Lightning. Device choice lives in
:mod:`lowmem_lightning.kernels.dispatch`.
"""
