"""Scalar quantisation of weight matrices, shared by the lossy encoder and the baselines.

* :mod:`.grids`: the quantiser grids (fixed-length B-bit, entropy-coded uniform step),
  round-to-nearest, fixed-length bit counts;
* :mod:`.gptq`: GPTQ — the one Hessian preparation (dead inputs, act order, damping,
  the inverse Cholesky factor), the numba column kernel, GPTQ over a grid (baselines)
  and GPTQ with a uniform step (the lossy encoder);
* :mod:`.trellis`: the trellis-coded quantiser (mode 4) inside GPTQ's column sweep;
* :mod:`.rate`: the secant search of a log-step that meets a rate (or distortion) target;
* :mod:`.registry`: the lossy quantisers, one entry each (what the command line offers).
"""
