"""Triton kernels, each beside its pure-PyTorch reference and launcher (one family per file).

This layer knows nothing about optimizers' bookkeeping or Lightning. Each family registers a
:class:`~lowmem_lightning.kernels.dispatch.Family`; an optimizer step is one
``dispatch(family, tensors, scalars)`` call, the one place that picks Triton / compiled / eager
(:mod:`lowmem_lightning.kernels.dispatch` says how to add a family).
"""
