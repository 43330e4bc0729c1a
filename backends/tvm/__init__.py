"""TVM backends (``"tvm-llvm"``, ``"tvm-arm"``): lower the frozen integer graph to Relax."""
