"""Render docker/nginx.conf.template into an nginx.conf.

The nginx image renders the same template with envsubst (see docker-compose.yml); this script does
the same substitution for the tests and for installs without containers:

    python docker/render_nginx.py --listen 127.0.0.1:8080 \
        --upstream 127.0.0.1:8001 --upstream 127.0.0.1:8002 --temp-dir /var/tmp/nginx -o nginx.conf

Only ${NAME} / $NAME for the names in VARIABLES are replaced (as envsubst does when it is given the
list of names); every other $word is an nginx variable and stays as it is.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

TEMPLATE = Path(__file__).with_name("nginx.conf.template")
VARIABLES = ("NGINX_LISTEN", "NGINX_UPSTREAM_SERVERS", "NGINX_RESOLVER", "NGINX_TEMP_DIR")
# Passive health checking, the same for every replica (docker-compose.yml uses the same parameters):
# after 3 failed attempts within 10 s a replica gets no requests for 10 s, then one probe request.
SERVER_PARAMETERS = "max_fails=3 fail_timeout=10s"


class TemplateError(ValueError):
    """The template and the values given for it do not fit together."""


def upstream_servers(addresses: Iterable[str], *, resolve: bool = False) -> str:
    """One `server` line per replica address ("host:port"); `resolve` re-resolves DNS names."""
    lines = []
    for address in addresses:
        address = address.strip()
        if not address or any(ch in address for ch in " ;{}\n"):
            raise TemplateError(f"not a host:port address: {address!r}")
        flag = " resolve" if resolve else ""
        lines.append(f"server {address}{flag} {SERVER_PARAMETERS};")
    if not lines:
        raise TemplateError("at least one upstream address is needed")
    return "\n        ".join(lines)


def render(values: Mapping[str, str], template: str | None = None) -> str:
    """Substitute the VARIABLES in the template; every one of them must be given."""
    text = TEMPLATE.read_text() if template is None else template
    missing = [name for name in VARIABLES if name not in values]
    if missing:
        raise TemplateError(f"no value for {', '.join(missing)}")
    pattern = re.compile(r"\$(?:\{(" + "|".join(VARIABLES) + r")\}|(" + "|".join(VARIABLES) + r")\b)")
    rendered = pattern.sub(lambda match: values[match.group(1) or match.group(2)], text)
    leftover = re.findall(r"\$\{?NGINX_[A-Z_]+\}?", rendered)
    if leftover:
        raise TemplateError(f"unknown placeholders left in the template: {sorted(set(leftover))}")
    return rendered


def render_for(
    listen: str,
    upstreams: Sequence[str],
    temp_dir: str | Path,
    *,
    resolver: str | None = None,
) -> str:
    """The configuration for a fixed set of replicas, or for DNS names re-resolved via `resolver`."""
    resolver_line = f"resolver {resolver} valid=5s ipv6=off;" if resolver else ""
    return render(
        {
            "NGINX_LISTEN": listen,
            "NGINX_UPSTREAM_SERVERS": upstream_servers(upstreams, resolve=bool(resolver)),
            "NGINX_RESOLVER": resolver_line,
            "NGINX_TEMP_DIR": str(temp_dir),
        }
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="8080", help="nginx listen address (port or host:port)")
    parser.add_argument(
        "--upstream", action="append", required=True, help="replica host:port (repeat for each replica)"
    )
    parser.add_argument("--temp-dir", required=True, help="directory writable by the nginx workers")
    parser.add_argument("--resolver", default=None, help="DNS server; re-resolves the upstream names")
    parser.add_argument("-o", "--output", type=Path, default=None, help="output file (default: stdout)")
    args = parser.parse_args(argv)
    try:
        text = render_for(args.listen, args.upstream, args.temp_dir, resolver=args.resolver)
    except TemplateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
