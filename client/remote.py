"""``model.fit(cluster="host:port")``: the same training, run by a pstrain cluster.

The arrays are written once to an ``.npz`` in the shared cache (content-addressed, so
a second fit on the same data writes nothing) and the job names that file; the
cluster's workers must see the same filesystem (true for ``psctl up`` clusters).
When the job ends, the trained weights come back into the local model.

Usage::

    model.fit(x, y, batch_size=128, epochs=5, cluster="127.0.0.1:50051")
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from client.progress import WatchView, follow
from pstrain.runtime import datasets
from pstrain.runtime.files import atomic_write


def _cache_dir() -> str:
    return os.environ.get("PSTRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pstrain")


def stage_arrays(x, y, validation_data) -> str:
    """Write the training (and validation) arrays to a content-addressed .npz; returns its path."""
    vx, vy = validation_data if validation_data is not None else (x, y)
    h = hashlib.sha1()
    for a in (x, y, vx, vy):
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(memoryview(a).cast("B"))
    path = os.path.join(_cache_dir(), "fit-data", h.hexdigest()[:20] + ".npz")
    if not os.path.exists(path):
        with atomic_write(path, mode=0o600) as f:
            np.savez(f, x_train=x, y_train=y, x_test=vx, y_test=vy)
    return path


def fit_on_cluster(model, x, y, batch_size, epochs, shuffle, validation_data, verbose, cluster, mode="sync"):
    """Train ``model`` on the cluster whose master is at ``cluster``; returns a History."""
    from client.job import Job, job_to_spec
    from client.nn.model import History
    from pstrain.transport.master_client import MasterClient

    path = stage_arrays(x, y, validation_data)
    job = Job(model, dataset=path, batch_size=batch_size, epochs=epochs, shuffle=shuffle, mode=mode)
    from client.launchers import user_credentials

    client = MasterClient(cluster, credentials=user_credentials(cluster))
    try:
        status = client.submit(job_to_spec(job, model.name))
        data = datasets.load(path)
        spe = -(-len(data.x_train) // int(batch_size))
        status = follow(client, status["id"], WatchView(epochs, spe, verbose=verbose))
        if status["state"] != "SUCCEEDED":
            raise RuntimeError(f"job {status['id']} {status['state']}: {status.get('error') or 'no error reported'}")
        _, names, weights = client.export(status["id"])
        by_name = dict(zip(names, weights))
        model.set_weights([by_name[n] for n in model._weight_names()])
        history = History()
        seen = set()
        for _, records in client.watch(status["id"]):
            for r in records:
                if r.get("final") or r.get("epoch", 0) < 1 or "val_loss" not in r or r["epoch"] in seen:
                    continue
                seen.add(r["epoch"])
                logs = {k: r[k] for k in ("loss", "accuracy") if k in r}
                if validation_data is not None:
                    logs.update({k: r[k] for k in ("val_loss", "val_accuracy") if k in r})
                history.add(r["epoch"] - 1, logs)
        return history
    finally:
        client.close()
