import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

# Most of the suite's time is XLA:CPU compiling small programs, and most of that is LLVM optimising them.
# The tests check values, not speed, so they compile with LLVM's optimisation off: the suite takes about
# two thirds of the time (session 13: 8.2 against 11.9 min on 2 cores). XLA's own HLO passes (fusion, buffer
# assignment, hence the memory tests) are the same at every level, and seqjax's C++ kernels are built apart.
# Setting the flag yourself (e.g. XLA_FLAGS=--xla_backend_optimization_level=2, XLA's default) keeps yours.
# Set here, before any test initialises a backend; example and benchmark subprocesses inherit it.
_OPT_FLAG = "--xla_backend_optimization_level"
if _OPT_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_OPT_FLAG}=0".strip()
