"""Triton kernels and their plain-torch references. Kernels know nothing of graphs."""


def __getattr__(name):
    # Lazy: importing the package must not import triton (it is slow and optional on CPU).
    if name == "OnlineConv":
        from .online_conv import OnlineConv

        return OnlineConv
    raise AttributeError(name)
