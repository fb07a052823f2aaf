"""``psctl certs init`` and ``psctl token create``: a cluster's certificates and its
users' tokens (see ``pstrain.transport.security``)."""
from __future__ import annotations

import os

from client.cli.common import EXIT_OK, CommandError
from client.launchers import default_state_dir
from pstrain.transport.security import CERT_ROLES, UserTokens, make_certificates, new_token, write_private


def certs_init_command(args) -> int:
    """A cluster CA and a certificate per role in DIR (an existing CA is reused), and the
    cluster's tokens beside them (``node.token``, ``admin.token``; kept if present): the
    complete set of secrets a cluster started by hand or by compose needs."""
    try:
        written = make_certificates(args.directory, hosts=args.host or (), days=args.days,
                                    roles=args.role or CERT_ROLES)
        for name in ("node.token", "admin.token"):
            path = os.path.join(args.directory, name)
            if not os.path.exists(path):
                write_private(path, new_token() + "\n")
                written.append(path)
    except (OSError, ValueError) as exc:
        raise CommandError(f"certs init: {exc}") from None
    for path in written:
        print(f"wrote {path}")
    print(f"start the cluster with --tls-dir {os.path.abspath(args.directory)} (or PSTRAIN_TLS_DIR); keep ca.key "
          "off the cluster's machines once every role has its certificate")
    return EXIT_OK


def token_create_command(args) -> int:
    """A new user token, stored (as its hash) in the master's token file; printed once."""
    path = args.tokens_file or os.path.join(os.path.abspath(os.path.expanduser(args.state_dir or default_state_dir())),
                                            "tokens.json")
    try:
        token = UserTokens.add(path, args.name, admin=args.admin)
    except (OSError, ValueError) as exc:
        raise CommandError(f"token create: {exc}") from None
    print(token)
    print(f"# user '{args.name}'{' (admin)' if args.admin else ''}, stored in {path}; give it to the user as "
          "PSTRAIN_TOKEN (it is shown only now)", file=__import__("sys").stderr)
    return EXIT_OK
