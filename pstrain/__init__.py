"""pstrain: the shared layers under the role packages, and (with the eager-API issue)
the public front door ``import pstrain as pt``.

The layers, top to bottom; imports point down only (import-linter contracts in
pyproject.toml, run by ``make test``)::

    client                         Keras API, job files, psctl, launchers
    master | psserver | worker     services: gRPC edge <-> plain types; independent of each other
    pstrain.transport              clients of the services (PS client, master client, membership)
    protos                         wire format: .proto, codec, tensor frames, shared memory, rpc helpers
    pstrain.runtime                core: plan, executor, step, optimizers, store, placement, data, model file
    pstrain.kernels                kernel backends (reference | cpu | cuda) behind one interface
    graph                          graph IR, op registry, autodiff

This module itself stays import-free so that importing any layer below does not
load the ones above it.
"""
