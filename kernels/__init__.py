"""Triton kernels for lgsae, installed as `lgsae.kernels` (never a top-level `kernels`: DESIGN §3).

One module per op, each holding its `@triton.jit` kernels and plain launchers with the signatures
of their twins in `lgsae.reference`: `topk_encode`, `sparse_decode`, `decoder_norm`.
`lgsae.ops` looks a launcher up here per call and falls back to the reference when the module or
launcher is absent, the tensor is not on CUDA, or `LGSAE_DISABLE_TRITON=1`.
"""
