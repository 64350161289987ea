"""Balancing backends behind one contract (:mod:`.contract`): the pure-torch reference (:mod:`.reference`, the
semantics), the compiled C++/CUDA op (:mod:`.compiled`) and the Triton kernels (:mod:`.triton`).
:mod:`mb_kernels.dispatch` picks one per device type. Importing this package loads no backend."""
