"""``python -m pstrain.transport.health``: exit 0 once this container's gRPC service
answers on ``127.0.0.1:$PSTRAIN_PORT`` (a health check). With ``PSTRAIN_TLS_DIR`` it
connects over mutual TLS with the container's own certificate (``master.crt`` or
``ps.crt``, whichever the directory holds), which the service accepts."""
from __future__ import annotations

import os
import sys

import grpc

from pstrain.transport import rpc
from pstrain.transport.security import Credentials, TLSFiles


def main(argv=None) -> int:
    port = os.environ.get("PSTRAIN_PORT", "")
    tls_dir = os.environ.get("PSTRAIN_TLS_DIR", "")
    role = next((r for r in ("master", "ps") if tls_dir and os.path.exists(os.path.join(tls_dir, f"{r}.crt"))), "ps")
    creds = Credentials(tls=TLSFiles(tls_dir, role) if tls_dir else None)
    channel = rpc.make_channel(f"127.0.0.1:{port}", role, creds)
    try:
        grpc.channel_ready_future(channel).result(timeout=3)
    except grpc.FutureTimeoutError:
        print(f"no pstrain service ready on 127.0.0.1:{port}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
