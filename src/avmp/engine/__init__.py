"""The engine: models, kernels, scheduler loop and server-facing generation.

Importing it turns off cuBLAS's split-K for this process, unless the process chose its
cuBLAS workspace itself (`avmp.engine.cublas`)."""

from avmp.engine.cublas import no_split_k

no_split_k()
