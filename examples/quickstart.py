"""Quickstart: start a server, pool connections to it with a client and rover, send one request."""

from __future__ import annotations

from typing import Any

from callosum_gevent import CallosumClient, CallosumServer, Rover


def echo(sock: Any, address: Any) -> None:
    """Answer every request line with the same line."""
    with sock.makefile("rwb") as stream:
        for line in stream:
            stream.write(line)
            stream.flush()


def main() -> None:
    with CallosumServer(("127.0.0.1", 0), echo) as server:
        server.start()
        address = ("127.0.0.1", server.server_port)
        # The rover fills the client at once, then keeps trading for lower slots.
        with (
            CallosumClient(max_slots=4) as client,
            Rover(client, {"local": address}),
            client.connection(timeout=5) as sock,
        ):
            sock.sendall(b"hello, callosum\n")
            print(sock.makefile("rb").readline().decode().strip())


if __name__ == "__main__":
    main()
