"""Every fast path of `seqjax.scan` behind one seam: custom VJPs and native CPU/CUDA kernels."""
