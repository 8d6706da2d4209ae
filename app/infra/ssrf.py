"""SSRF guard for user-supplied webhook URLs.

Imported by the API process, so it uses the standard library only (no httpx) and is cheap
to import.  The worker calls :func:`validate_webhook_url` again right before every delivery
attempt (DNS answers may change between submission and delivery) and connects to the
addresses it returns.

Policy
------
* scheme ``http`` or ``https``; a host is required; no userinfo (``user:pass@``);
  at most :data:`MAX_URL_LENGTH` characters; no whitespace, control characters or
  backslashes anywhere (they are where URL parsers disagree with each other).
* The host is resolved (``getaddrinfo``, IPv4 and IPv6).  IP literals, including
  ``[::1]`` and the legacy IPv4 spellings that ``inet_aton``/browsers accept
  (``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``127.1``), are parsed here, with the WHATWG
  URL Standard's IPv4 parser, to the address they really denote.
* EVERY resolved address must be public (:func:`is_public_address`); one private answer
  among public ones is enough to refuse (the HTTP client might pick it).
* The allow-list (operator setting) opens an exact host name (case-insensitive, compared
  before resolution; its addresses are then not judged) or any address inside an
  allow-listed network.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "MAX_URL_LENGTH",
    "AllowList",
    "IPAddress",
    "IPNetwork",
    "ParsedURL",
    "UnsafeURLError",
    "is_public_address",
    "parse_webhook_url",
    "validate_webhook_url",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_URL_LENGTH = 2048

INVALID_URL = "invalid_url"
FORBIDDEN_ADDRESS = "forbidden_address"
UNRESOLVABLE_HOST = "unresolvable_host"

_ALLOWED_SCHEMES = frozenset({"http", "https"})
# ASCII host names after IDNA encoding: letters, digits, hyphen, underscore (seen in real
# DNS names), dots.  Anything else is refused as invalid rather than handed to a resolver.
_HOST_RE = re.compile(r"^[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?$")
# C0 controls, space, DEL and backslash: refused anywhere in the URL.
_BAD_URL_CHARS_RE = re.compile(r"[\x00-\x20\x7f\\]")

_SHARED_ADDRESS_SPACE = ipaddress.IPv4Network("100.64.0.0/10")  # RFC 6598 (CGNAT)
_NAT64_WKP = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052, embeds an IPv4 address
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215, local-use NAT64
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")  # RFC 3056
_TEREDO = ipaddress.IPv6Network("2001::/32")  # RFC 4380


class UnsafeURLError(ValueError):
    """The URL may not be used as a webhook target.

    ``code`` is machine-readable: ``invalid_url``, ``forbidden_address`` or
    ``unresolvable_host``.
    """

    code: str

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ParsedURL:
    """The parts of a syntactically valid webhook URL that the guard cares about."""

    scheme: str  # "http" | "https"
    host: str  # lower-case ASCII (IDNA), no brackets, no trailing dot
    port: int  # explicit or the scheme's default
    ip: IPAddress | None  # set when the host is an IP literal (any legacy IPv4 spelling)


def _normalise_host_name(name: str) -> str:
    """Lower-case ASCII form of a host name, trailing dot removed; ValueError if invalid."""
    name = name.strip().lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"invalid international host name: {exc}") from None
    if not _HOST_RE.match(name) or len(name.rstrip(".")) > 253:
        raise ValueError(f"invalid host name {name!r}")
    if any(len(label) > 63 for label in name.split(".")):
        raise ValueError(f"host name label too long in {name!r}")
    return name.rstrip(".")


@dataclass(frozen=True)
class AllowList:
    """Operator-configured exceptions to the public-address rule."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        """Build from strings: IP addresses, CIDR networks or exact host names.

        Blank entries are skipped.  A network with host bits set (``10.0.0.1/8``) or any
        other malformed entry raises :class:`ValueError`.
        """
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for raw in entries:
            entry = raw.strip()
            if not entry:
                continue
            candidate = entry[1:-1] if entry.startswith("[") and entry.endswith("]") else entry
            try:
                networks.append(ipaddress.ip_network(candidate, strict=True))
                continue
            except ValueError as exc:
                if "/" in candidate or ":" in candidate:
                    raise ValueError(f"invalid allow-list network {entry!r}: {exc}") from None
            try:
                hosts.add(_normalise_host_name(entry))
            except ValueError as exc:
                raise ValueError(f"invalid allow-list entry {entry!r}: {exc}") from None
        return cls(hosts=frozenset(hosts), networks=tuple(networks))

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def allows_address(self, ip: IPAddress) -> bool:
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        return any(c in net for c in candidates for net in self.networks)


def is_public_address(ip: IPAddress) -> bool:
    """True when ``ip`` is a globally routable unicast address a webhook may target.

    Refuses private, loopback, link-local, multicast, reserved, unspecified, shared
    address space (100.64.0.0/10), site-local, unique-local; IPv6 forms that embed an
    IPv4 address (IPv4-mapped, NAT64 64:ff9b::/96, 6to4, Teredo) are judged by the
    embedded address; local-use NAT64 (64:ff9b:1::/48) is refused outright.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_public_address(ip.ipv4_mapped)
        if ip in _NAT64_LOCAL:
            return False
        if ip in _NAT64_WKP:
            return is_public_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip in _SIX_TO_FOUR:
            embedded = ip.sixtofour
            if embedded is None or not is_public_address(embedded):
                return False
        if ip in _TEREDO:
            teredo = ip.teredo
            if teredo is None or not all(is_public_address(part) for part in teredo):
                return False
        if ip.is_site_local:
            return False
    elif ip in _SHARED_ADDRESS_SPACE:
        return False
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


_DIGITS = {8: "01234567", 10: "0123456789", 16: "0123456789abcdef"}


def _parse_ipv4_number(part: str) -> int:
    part = part.lower()
    if part.startswith("0x"):
        digits, base = part[2:], 16
        if not digits:
            return 0
    elif len(part) > 1 and part.startswith("0"):
        digits, base = part[1:], 8
    else:
        digits, base = part, 10
    if not digits or any(c not in _DIGITS[base] for c in digits):
        raise ValueError(f"bad IPv4 number {part!r}")
    return int(digits, base)


def _legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """WHATWG "ends in a number" + IPv4 parser.

    Returns the address for any host the URL Standard (and inet_aton) treats as IPv4,
    None for an ordinary host name; ValueError for an invalid numeric host such as
    ``256.256.256.256`` or ``1.2.3.4.5``.
    """
    labels = host.split(".")
    if labels[-1] == "" and len(labels) > 1:
        labels.pop()
    last = labels[-1]
    is_numeric = bool(last) and (
        last.isdigit()
        or (last[:2].lower() == "0x" and all(c in _DIGITS[16] for c in last[2:].lower()))
    )
    if not is_numeric:
        return None
    if len(labels) > 4 or any(not label for label in labels):
        raise ValueError(f"invalid IPv4 address {host!r}")
    numbers = [_parse_ipv4_number(label) for label in labels]
    if any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        raise ValueError(f"IPv4 address out of range {host!r}")
    value = numbers[-1]
    for i, n in enumerate(numbers[:-1]):
        value += n * 256 ** (3 - i)
    return ipaddress.IPv4Address(value)


def parse_webhook_url(url: str) -> ParsedURL:
    """Syntax checks only (no DNS); raises :class:`UnsafeURLError` with ``invalid_url``."""

    def invalid(message: str) -> UnsafeURLError:
        return UnsafeURLError(INVALID_URL, message)

    if not isinstance(url, str) or not url:
        raise invalid("URL is empty")
    if len(url) > MAX_URL_LENGTH:
        raise invalid(f"URL is longer than {MAX_URL_LENGTH} characters")
    if _BAD_URL_CHARS_RE.search(url):
        raise invalid("URL contains whitespace, control characters or backslashes")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        raise invalid(f"malformed URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _ALLOWED_SCHEMES:
        raise invalid("URL scheme must be http or https")
    netloc = parts.netloc
    if "@" in netloc:
        raise invalid("URL must not contain credentials (user:password@)")
    raw_host = parts.hostname  # lower-cased, brackets removed
    if not raw_host:
        raise invalid("URL has no host")
    try:
        port = parts.port
    except ValueError as exc:
        raise invalid(f"invalid port: {exc}") from None
    if port is None:
        port = 443 if scheme == "https" else 80
    elif port == 0:
        raise invalid("invalid port: 0")

    ip: IPAddress | None
    if netloc.startswith("["):
        if "%" in raw_host:
            raise invalid("IPv6 zone identifiers are not allowed")
        try:
            ip = ipaddress.IPv6Address(raw_host)
        except ValueError:
            raise invalid(f"invalid IPv6 literal {raw_host!r}") from None
        return ParsedURL(scheme=scheme, host=raw_host, port=port, ip=ip)
    if "%" in raw_host:
        raise invalid("percent-encoded host names are not allowed")
    try:
        host = _normalise_host_name(raw_host)
    except ValueError as exc:
        raise invalid(str(exc)) from None
    try:
        ip = _legacy_ipv4(host)
    except ValueError as exc:
        raise invalid(str(exc)) from None
    return ParsedURL(scheme=scheme, host=host, port=port, ip=ip)


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except UnicodeError as exc:
        raise UnsafeURLError(INVALID_URL, f"invalid host name {host!r}: {exc}") from None
    except OSError as exc:  # socket.gaierror and friends
        raise UnsafeURLError(UNRESOLVABLE_HOST, f"cannot resolve host {host!r}: {exc}") from None
    addresses: list[IPAddress] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        try:
            ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        except ValueError:
            continue
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise UnsafeURLError(UNRESOLVABLE_HOST, f"host {host!r} has no IP addresses")
    return addresses


def _is_localhost_name(host: str) -> bool:
    # RFC 6761: "localhost" and "*.localhost" always mean loopback; refuse without DNS.
    return host == "localhost" or host.endswith(".localhost")


def validate_webhook_url(url: str, *, allow: AllowList, resolve: bool = True) -> list[IPAddress]:
    """Check ``url`` against the SSRF policy and return the vetted addresses.

    With ``resolve=False`` a host name is not looked up (syntax and name checks only) and
    the returned list is empty for it; IP literals are always judged.
    Raises :class:`UnsafeURLError` (``invalid_url``, ``forbidden_address``,
    ``unresolvable_host``).
    """
    parsed = parse_webhook_url(url)
    if parsed.ip is not None:
        addresses: list[IPAddress] = [parsed.ip]
    else:
        if allow.allows_host(parsed.host):
            return _resolve(parsed.host, parsed.port) if resolve else []
        if _is_localhost_name(parsed.host):
            raise UnsafeURLError(FORBIDDEN_ADDRESS, f"host {parsed.host!r} is a loopback name")
        if not resolve:
            return []
        addresses = _resolve(parsed.host, parsed.port)
    for ip in addresses:
        if not (allow.allows_address(ip) or is_public_address(ip)):
            where = (
                f"address {ip}"
                if parsed.ip is not None
                else f"host {parsed.host!r} resolves to {ip}, which"
            )
            raise UnsafeURLError(FORBIDDEN_ADDRESS, f"{where} is not a public address")
    return addresses
