"""SSRF guard: no network access; host names resolve through a monkeypatched getaddrinfo."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from app.infra.ssrf import (
    AllowList,
    UnsafeURLError,
    is_public_address,
    parse_webhook_url,
    validate_webhook_url,
)

NO_ALLOW = AllowList.parse([])
TEST_ALLOW = AllowList.parse(["127.0.0.1", "::1", "10.0.0.0/8", "Receiver.Internal", "localhost"])


def fake_resolver(table: dict[str, list[str]]) -> Callable[..., list[Any]]:
    """A getaddrinfo that answers from ``table`` and fails for every other name."""

    def getaddrinfo(host: str, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        infos: list[Any] = []
        for addr in table[host]:
            if ":" in addr:
                infos.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (addr, port, 0, 0)))
            else:
                infos.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (addr, port)))
        return infos

    return getaddrinfo


@pytest.fixture(autouse=True)
def no_real_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts with a resolver that knows no names (no network here)."""
    monkeypatch.setattr(socket, "getaddrinfo", fake_resolver({}))


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("http://127.0.0.1/hook", "forbidden_address"),
        ("http://10.0.0.1/", "forbidden_address"),
        ("http://172.16.5.4/", "forbidden_address"),
        ("http://192.168.1.1/", "forbidden_address"),
        ("http://169.254.169.254/latest/meta-data/", "forbidden_address"),
        ("http://100.64.0.1/", "forbidden_address"),
        ("http://0.0.0.0/", "forbidden_address"),
        ("http://224.0.0.1/", "forbidden_address"),
        ("http://255.255.255.255/", "forbidden_address"),
        ("http://[::1]/", "forbidden_address"),
        ("http://[::]/", "forbidden_address"),
        ("http://[fe80::1]/", "forbidden_address"),
        ("http://[fc00::1]/", "forbidden_address"),
        ("http://[fd12:3456::1]/", "forbidden_address"),
        ("http://[fec0::1]/", "forbidden_address"),
        ("http://[ff0e::1]/", "forbidden_address"),
        ("http://[::ffff:127.0.0.1]/", "forbidden_address"),
        ("http://[::ffff:10.0.0.1]/", "forbidden_address"),
        ("http://[::ffff:a9fe:a9fe]/", "forbidden_address"),
        ("http://[64:ff9b::a00:1]/", "forbidden_address"),  # NAT64 of 10.0.0.1
        ("http://[64:ff9b:1::1]/", "forbidden_address"),  # local-use NAT64
        ("http://[2002:7f00:1::]/", "forbidden_address"),  # 6to4 of 127.0.0.1
        ("http://[2002:c0a8:101::1]/", "forbidden_address"),  # 6to4 of 192.168.1.1
        ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", "forbidden_address"),  # Teredo
        ("http://2130706433/", "forbidden_address"),
        ("http://0x7f.0.0.1/", "forbidden_address"),
        ("http://0x7f.1/", "forbidden_address"),
        ("http://0177.0.0.1/", "forbidden_address"),
        ("http://127.1/", "forbidden_address"),
        ("http://127.0.0.1./", "forbidden_address"),
        ("http://0xa9fea9fe/", "forbidden_address"),
        ("http://localhost/", "forbidden_address"),
        ("http://LOCALHOST:8080/", "forbidden_address"),
        ("http://api.localhost/", "forbidden_address"),
        ("ftp://x/", "invalid_url"),
        ("file:///etc/passwd", "invalid_url"),
        ("gopher://127.0.0.1:6379/_INFO", "invalid_url"),
        ("javascript:alert(1)", "invalid_url"),
        ("http://user:pass@example.com/", "invalid_url"),
        ("http://user@example.com/", "invalid_url"),
        ("http://example.com@127.0.0.1/", "invalid_url"),
        ("http:///path-only", "invalid_url"),
        ("http://", "invalid_url"),
        ("http://:8080/", "invalid_url"),
        ("/relative/path", "invalid_url"),
        ("", "invalid_url"),
        ("http://example.com:99999/", "invalid_url"),
        ("http://example.com:0/", "invalid_url"),
        ("http://example.com:port/", "invalid_url"),
        ("http://exa mple.com/", "invalid_url"),
        ("http://example.com\\@127.0.0.1/", "invalid_url"),
        ("http://example.com/\r\nX-Injected: 1", "invalid_url"),
        ("http://[::1/", "invalid_url"),
        ("http://[not-an-ip]/", "invalid_url"),
        ("http://[fe80::1%25eth0]/", "invalid_url"),
        ("http://256.0.0.1/", "invalid_url"),
        ("http://1.2.3.4.5/", "invalid_url"),
        ("http://exa_mple!.com/", "invalid_url"),
        ("http://" + "a" * 64 + ".com/", "invalid_url"),
        ("http://example.com/" + "a" * 2048, "invalid_url"),
        ("http://does-not-exist.example/", "unresolvable_host"),
    ],
)
def test_refused(url: str, code: str) -> None:
    with pytest.raises(UnsafeURLError) as info:
        validate_webhook_url(url, allow=NO_ALLOW)
    assert info.value.code == code, str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8000/hook", ["127.0.0.1"]),
        ("http://2130706433/", ["127.0.0.1"]),  # legacy spelling, same address
        ("http://[::1]:9000/", ["::1"]),
        ("http://[::ffff:127.0.0.1]/", ["::ffff:127.0.0.1"]),  # judged by embedded IPv4
        ("http://10.20.30.40/", ["10.20.30.40"]),
        ("https://10.0.0.1:8443/x?y=1", ["10.0.0.1"]),
    ],
)
def test_allow_listed_addresses(url: str, expected: list[str]) -> None:
    result = validate_webhook_url(url, allow=TEST_ALLOW)
    assert result == [ipaddress.ip_address(a) for a in expected]


def test_allow_list_does_not_open_neighbours() -> None:
    for url in ("http://127.0.0.2/", "http://[::2]/", "http://192.168.0.1/", "http://[fe80::1]/"):
        with pytest.raises(UnsafeURLError) as info:
            validate_webhook_url(url, allow=TEST_ALLOW)
        assert info.value.code == "forbidden_address"


def test_allow_listed_host_name_is_not_judged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        fake_resolver({"localhost": ["127.0.0.1", "::1"], "receiver.internal": ["192.168.7.7"]}),
    )
    assert validate_webhook_url("http://localhost:8000/hook", allow=TEST_ALLOW) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    # Host names match case-insensitively, and a trailing dot does not matter.
    assert validate_webhook_url("http://RECEIVER.internal./", allow=TEST_ALLOW) == [
        ipaddress.ip_address("192.168.7.7")
    ]
    # Not allow-listed by name: the same private address is refused.
    monkeypatch.setattr(socket, "getaddrinfo", fake_resolver({"other.internal": ["192.168.7.7"]}))
    with pytest.raises(UnsafeURLError) as info:
        validate_webhook_url("http://other.internal/", allow=TEST_ALLOW)
    assert info.value.code == "forbidden_address"


@pytest.mark.parametrize(
    "url", ["http://93.184.216.34/", "https://[2606:4700::1111]:8443/hook", "http://8.8.8.8"]
)
def test_public_ip_literal_accepted_without_dns(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    def boom(*args: Any, **kwargs: Any) -> list[Any]:
        raise AssertionError("IP literals must not be resolved")

    monkeypatch.setattr(socket, "getaddrinfo", boom)
    (address,) = validate_webhook_url(url, allow=NO_ALLOW)
    assert is_public_address(address)


def test_name_resolving_to_private_address_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", fake_resolver({"evil.example": ["10.0.0.1"]}))
    with pytest.raises(UnsafeURLError) as info:
        validate_webhook_url("https://evil.example/hook", allow=NO_ALLOW)
    assert info.value.code == "forbidden_address"
    assert "10.0.0.1" in str(info.value)


@pytest.mark.parametrize(
    "answers",
    [
        ["93.184.216.34", "127.0.0.1"],
        ["93.184.216.34", "::1"],
        ["2606:4700::1111", "fd00::1"],
        ["93.184.216.34", "169.254.169.254"],
        ["93.184.216.34", "::ffff:10.0.0.1"],
    ],
)
def test_mixed_public_and_private_answers_refused(
    monkeypatch: pytest.MonkeyPatch, answers: list[str]
) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", fake_resolver({"mixed.example": answers}))
    with pytest.raises(UnsafeURLError) as info:
        validate_webhook_url("http://mixed.example/", allow=NO_ALLOW)
    assert info.value.code == "forbidden_address"


def test_name_resolving_to_public_addresses_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        fake_resolver({"ok.example": ["93.184.216.34", "2606:4700::1111", "93.184.216.34"]}),
    )
    assert validate_webhook_url("https://OK.example/hook", allow=NO_ALLOW) == [
        ipaddress.ip_address("93.184.216.34"),
        ipaddress.ip_address("2606:4700::1111"),
    ]


def test_international_host_name_is_idna_encoded(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    resolver = fake_resolver({"xn--bcher-kva.example": ["93.184.216.34"]})

    def spy(host: str, *args: Any, **kwargs: Any) -> list[Any]:
        seen.append(host)
        return resolver(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", spy)
    assert validate_webhook_url("http://bücher.example/", allow=NO_ALLOW)
    assert seen == ["xn--bcher-kva.example"]


def test_resolve_false_skips_dns_but_judges_literals() -> None:
    assert validate_webhook_url("https://unknown.example/", allow=NO_ALLOW, resolve=False) == []
    for url, code in [
        ("http://10.0.0.1/", "forbidden_address"),
        ("http://localhost/", "forbidden_address"),
        ("ftp://example.com/", "invalid_url"),
    ]:
        with pytest.raises(UnsafeURLError) as info:
            validate_webhook_url(url, allow=NO_ALLOW, resolve=False)
        assert info.value.code == code


def test_parse_webhook_url() -> None:
    parsed = parse_webhook_url("HTTPS://Example.COM./a?b#c")
    assert (parsed.scheme, parsed.host, parsed.port, parsed.ip) == (
        "https",
        "example.com",
        443,
        None,
    )
    parsed = parse_webhook_url("http://0x7f.1:8080/")
    assert parsed.ip == ipaddress.ip_address("127.0.0.1")
    assert parsed.port == 8080


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True),
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("64:ff9b::808:808", True),  # NAT64 of 8.8.8.8
        ("2002:808:808::1", True),  # 6to4 of 8.8.8.8
        ("::ffff:8.8.8.8", True),
        ("100.64.0.1", False),
        ("100.127.255.254", False),
        ("192.0.2.1", False),  # documentation
        ("198.18.0.1", False),  # benchmarking
        ("240.0.0.1", False),  # reserved
        ("fec0::1", False),
        ("2001:db8::1", False),
        ("ff02::1", False),
    ],
)
def test_is_public_address(address: str, public: bool) -> None:
    assert is_public_address(ipaddress.ip_address(address)) is public


def test_allow_list_parse() -> None:
    allow = AllowList.parse(
        [" 127.0.0.1 ", "::1", "[::2]", "10.0.0.0/8", "fd00::/8", "Receiver.Internal.", ""]
    )
    assert allow.hosts == frozenset({"receiver.internal"})
    assert allow.networks == (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("::2/128"),
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::/8"),
    )
    assert allow.allows_host("RECEIVER.internal")
    assert allow.allows_address(ipaddress.ip_address("10.1.2.3"))
    assert allow.allows_address(ipaddress.ip_address("::ffff:10.1.2.3"))
    assert not allow.allows_address(ipaddress.ip_address("11.1.2.3"))


@pytest.mark.parametrize("entry", ["10.0.0.1/8", "10.0.0.0/33", "not a host", "fe80::zz", "a/b"])
def test_allow_list_parse_rejects_malformed(entry: str) -> None:
    with pytest.raises(ValueError):
        AllowList.parse([entry])


def test_unsafe_url_error_carries_code() -> None:
    err = UnsafeURLError("invalid_url", "nope")
    assert err.code == "invalid_url"
    assert str(err) == "nope"


def test_module_imports_only_stdlib() -> None:
    code = (
        "import sys; import app.infra.ssrf; "
        "bad = [m for m in ('httpx', 'httpcore', 'pydantic', 'sqlalchemy') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert out.stdout.strip() == ""
