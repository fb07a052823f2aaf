"""Test-wide setup.

CUDA kernels run in Numba's simulator unless PSTRAIN_REAL_GPU=1 (then
``pytest -m gpu`` runs the same kernel tests on a real GPU). The variable must be
set before anything imports numba, which is why it lives here. And the cluster's
tokens (below).
"""
import os

if os.environ.get("PSTRAIN_REAL_GPU") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

# The cluster's credentials for every test and every process a test starts: services
# need a node token, users a token the master knows (here the admin token). Tests of
# authentication itself pass their own credentials explicitly.
if not os.environ.get("PSTRAIN_NODE_TOKEN"):
    import secrets

    os.environ["PSTRAIN_NODE_TOKEN"] = "test-node-" + secrets.token_urlsafe(16)
    os.environ["PSTRAIN_ADMIN_TOKEN"] = os.environ["PSTRAIN_TOKEN"] = "test-admin-" + secrets.token_urlsafe(16)
