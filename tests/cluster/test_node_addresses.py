"""What a process needs to join a multi-node cluster, as pure functions: the network interface
gloo must advertise (the node's cluster address, not what the hostname resolves to), and the
authentication mode a driver joining a token-protected cluster must use."""

import socket

import psutil
import pytest

from rlhf.ray.session import join_auth_env
from rlhf.ray.stage_worker import gloo_interface_env, interface_with_address


def _a_non_loopback_address() -> tuple[str, str] | None:
    for name, addresses in psutil.net_if_addrs().items():
        for entry in addresses:
            if entry.family == socket.AF_INET and not entry.address.startswith("127."):
                return name, entry.address
    return None


def test_gloo_advertises_the_interface_holding_the_nodes_address():
    found = _a_non_loopback_address()
    if found is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    name, address = found
    assert interface_with_address(address) == name
    assert gloo_interface_env(address, environ={}) == {"GLOO_SOCKET_IFNAME": name}


def test_gloo_is_left_alone_on_one_machine_when_the_user_chose_or_when_no_interface_has_it():
    assert gloo_interface_env("127.0.0.1", environ={}) == {}
    assert gloo_interface_env("192.0.2.7", environ={}) == {}  # TEST-NET-1: on no interface here
    found = _a_non_loopback_address()
    if found is not None:
        assert gloo_interface_env(found[1], environ={"GLOO_SOCKET_IFNAME": "ib0"}) == {}


def test_a_driver_with_a_token_at_hand_joins_in_token_mode(tmp_path):
    home = tmp_path / "home"
    assert join_auth_env({"HOME": str(home)}) == {}  # no token anywhere: Ray's own default
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("t")
    assert join_auth_env({"HOME": str(home)}) == {"RAY_AUTH_MODE": "token"}
    assert join_auth_env({"HOME": str(tmp_path), "RAY_AUTH_TOKEN": "t"}) == {"RAY_AUTH_MODE": "token"}
    assert join_auth_env({"HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": "/x"}) == {"RAY_AUTH_MODE": "token"}
    # A mode the user set is theirs.
    assert join_auth_env({"HOME": str(home), "RAY_AUTH_MODE": "disabled"}) == {}
