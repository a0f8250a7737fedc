"""The Python kernel parts shared across spaces, cells and tasks (below all of them).

``fused_ops``: building blocks of the hand-written recurrent sequence kernels and the switches
that say when a kernel may run (``kernels_allowed``, ``eager_kernels``); ``blocks``: the recurrent
building blocks (output rule, locked dropout, init) a supernet and its derived cell must share.
Neither imports ``spaces``, ``cells`` or ``tasks``, so each of those can import them without a
cycle and without a derived cell depending on a search space. The C++ twins are in ``native``.
"""
