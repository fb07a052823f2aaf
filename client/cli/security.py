"""``psctl certs init`` and ``psctl token create``: a cluster's certificates and its
users' tokens (see ``pstrain.transport.security``)."""
from __future__ import annotations

import os
import sys

from client.cli.common import EXIT_OK, EXIT_USAGE, CommandError
from client.launchers import default_state_dir
from pstrain.transport.security import (
    CERT_ROLES,
    SERVICE_SECRETS,
    USER_SECRETS,
    UserTokens,
    hand_over,
    make_certificates,
    make_cluster_tokens,
)


def certs_init_command(args) -> int:
    """A cluster CA and a certificate per role in DIR (an existing CA is reused), and the
    cluster's tokens beside them (``node.token``, ``admin.token``, kept if present, and
    ``tokens.json``, the admin token's digest for a master): the complete set of secrets a
    cluster started by hand or by compose needs. ``--owner`` gives the services' private
    files to the containers' user and, under sudo, the rest to the user who ran it."""
    owner = _owner(args.owner) if args.owner else None
    try:
        written = make_certificates(args.directory, hosts=args.host or (), days=args.days,
                                    roles=args.role or CERT_ROLES)
        written += make_cluster_tokens(args.directory)
    except PermissionError as exc:
        raise CommandError(f"certs init: {_not_yours(exc)}") from None
    except (OSError, ValueError) as exc:
        raise CommandError(f"certs init: {exc}") from None
    for path in written:
        print(f"wrote {path}")
    if owner is not None:
        user = None
        if os.geteuid() == 0 and os.environ.get("SUDO_UID", "").isdigit():
            user = (int(os.environ["SUDO_UID"]), int(os.environ.get("SUDO_GID") or os.environ["SUDO_UID"]))
        try:
            given = hand_over(args.directory, owner, user)
        except PermissionError:
            raise CommandError(f"certs init --owner: only root may give files to uid {owner[0]}; run it with sudo "
                               "(the files you read stay yours), or chown "
                               f"{' '.join(SERVICE_SECRETS)} in {args.directory} yourself") from None
        print(f"gave {', '.join(os.path.basename(p) for p in given)} to {owner[0]}:{owner[1]} (the services read "
              f"them); {', '.join(USER_SECRETS)} stay "
              f"{'yours' if user is None else str(user[0]) + ':' + str(user[1])}")
    print(f"start the cluster with --tls-dir {os.path.abspath(args.directory)} (or PSTRAIN_TLS_DIR); keep ca.key "
          "off the cluster's machines once every role has its certificate")
    return EXIT_OK


def _not_yours(exc: PermissionError) -> str:
    """What a refused write in the directory means: usually a file ``--owner`` gave away."""
    try:
        uid = os.stat(exc.filename).st_uid
    except (OSError, TypeError):
        return str(exc)
    if uid == os.geteuid():
        return str(exc)
    return (f"cannot write {exc.filename}: it belongs to uid {uid} (certs init --owner gives the services' files "
            "to the containers' user); run it with sudo, and --owner again")


def _owner(text: str) -> tuple[int, int]:
    """``UID`` or ``UID:GID`` (numbers: the containers' user need not exist here)."""
    uid, _, gid = text.partition(":")
    if not uid.isdigit() or not (gid or uid).isdigit():
        raise CommandError(f"certs init --owner: want UID or UID:GID in numbers (e.g. 10001, the image's user), "
                           f"got {text!r}", EXIT_USAGE)
    return int(uid), int(gid or uid)


def token_command(args) -> int:
    """``psctl token create NAME`` (a new user token, stored as its hash in the master's
    token file and printed once), ``token list`` (the users and how many tokens each has)
    and ``token revoke NAME`` (every token of that user; a running master refuses them
    from its next call, as it rereads the file when it changes)."""
    path = args.tokens_file or os.path.join(os.path.abspath(os.path.expanduser(args.state_dir or default_state_dir())),
                                            "tokens.json")
    if args.action != "list" and not args.name:
        raise CommandError(f"token {args.action}: give the user's name", EXIT_USAGE)
    try:
        if args.action == "create":
            token = UserTokens.add(path, args.name, admin=args.admin)
        elif args.action == "revoke":
            count = UserTokens.revoke(path, args.name)
        else:
            users = UserTokens.users(path)
    except (OSError, ValueError) as exc:
        raise CommandError(f"token {args.action}: {exc}") from None
    if args.action == "create":
        print(token)
        print(f"# user '{args.name}'{' (admin)' if args.admin else ''}, stored in {path}; give it to the user as "
              "PSTRAIN_TOKEN (it is shown only now)", file=sys.stderr)
    elif args.action == "revoke":
        if not count:
            raise CommandError(f"token revoke: no token of user '{args.name}' in {path}", EXIT_USAGE)
        print(f"revoked {count} token{'s' if count > 1 else ''} of '{args.name}' in {path}; a master reading that file "
              "refuses them from its next call")
    else:
        print(f"{'USER':<24} {'ADMIN':<6} TOKENS")
        for name, user in sorted(users.items()):
            print(f"{name:<24} {'yes' if user['admin'] else 'no':<6} {user['tokens']}")
    return EXIT_OK
