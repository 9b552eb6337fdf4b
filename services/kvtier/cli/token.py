"""``kvtier token``: tenant tokens of a daemon's tokens file (``KVTIER_AUTH__TOKENS_FILE``).

    kvtier token create --tokens-file FILE --namespace NS [--namespace NS2 ...] [--read-only]
        prints a new random token, one line on stdout; FILE keeps only its SHA-256 hash
    kvtier token list --tokens-file FILE [--json]
        id, namespaces, access and creation time of each token (never the token)
    kvtier token revoke --tokens-file FILE ID_OR_TOKEN
        removes the token; a running daemon stops accepting it within a second (or at once
        on SIGHUP), without a restart

``--tokens-file`` defaults to ``KVTIER_AUTH__TOKENS_FILE``. The file is written atomically with
mode 0600; concurrent commands on the same file do not lose each other's changes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

ENV = "KVTIER_AUTH__TOKENS_FILE"


def register(sub: Any) -> None:
    p = sub.add_parser("token", help="create, list and revoke tenant tokens",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tsub = p.add_subparsers(dest="token_command", required=True, metavar="ACTION")

    def file_option(q: argparse.ArgumentParser) -> None:
        q.add_argument("--tokens-file", metavar="FILE", default=os.environ.get(ENV),
                       required=os.environ.get(ENV) is None,
                       help=f"the tokens file (default: ${ENV})")

    c = tsub.add_parser("create", help="create a token; prints it on stdout (one line)")
    file_option(c)
    c.add_argument("--namespace", "-n", action="append", required=True, metavar="NS",
                   help="a namespace the token grants (repeat for several)")
    c.add_argument("--read-only", action="store_true",
                   help="the token may get, look up and read stats, not put, promote or delete")
    c.set_defaults(func=create)

    ls = tsub.add_parser("list", help="list the tokens (ids and grants, never the tokens)")
    file_option(ls)
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(func=list_tokens)

    r = tsub.add_parser("revoke", help="revoke a token by its id (from list) or by the token")
    file_option(r)
    r.add_argument("which", metavar="ID_OR_TOKEN",
                   help="the token's id (from `kvtier token list`) or the token itself")
    r.set_defaults(func=revoke)


def create(args: argparse.Namespace) -> int:
    from kvtier.transport.auth.tokens import TokenFile

    token, entry = TokenFile(args.tokens_file).create(args.namespace, args.read_only)
    print(f"created token {entry.id} for {', '.join(entry.namespaces)}"
          f"{' (read-only)' if entry.read_only else ''}", file=sys.stderr)
    print(token, flush=True)
    return 0


def list_tokens(args: argparse.Namespace) -> int:
    from kvtier.transport.auth.tokens import TokenFile

    entries = TokenFile(args.tokens_file).entries()
    if args.json:
        for e in entries:
            view = e.to_json()
            del view["hash"]
            print(json.dumps(view))
        return 0
    if not entries:
        print(f"no tokens in {args.tokens_file}", file=sys.stderr)
        return 0
    print(f"{'ID':<10}{'ACCESS':<12}{'CREATED':<22}NAMESPACES")
    for e in entries:
        print(f"{e.id:<10}{'read-only' if e.read_only else 'read-write':<12}{e.created:<22}"
              f"{','.join(e.namespaces)}")
    return 0


def revoke(args: argparse.Namespace) -> int:
    from kvtier.transport.auth.tokens import TokenFile

    entry = TokenFile(args.tokens_file).revoke(args.which)
    print(f"revoked token {entry.id} ({', '.join(entry.namespaces)})", file=sys.stderr)
    return 0
