"""Feed a Callosum client from plain stdlib socket code, after gevent's monkey-patching.

Code that already opens its own connections with :mod:`socket` and threads
can keep doing so: once ``patch_all()`` has run those are gevent sockets, and
offering one to ``client.new_connection(slot, sock)`` is all a rover does.
Run it with ``python examples/legacy_monkeypatched.py``; it starts two local
backends, dials them by hand, then serves requests from ordinary threads.
"""

from gevent import monkey

monkey.patch_all()

# Everything below is stdlib code, patched to cooperate with gevent.
import socket  # noqa: E402
import threading  # noqa: E402
from typing import Any  # noqa: E402

from callosum_gevent import CallosumClient, CallosumServer  # noqa: E402


def echo(sock: Any, address: Any) -> None:
    """Answer every request line with ``<port> <line>``."""
    port = sock.getsockname()[1]
    with sock.makefile("rwb") as stream:
        for line in stream:
            stream.write(b"%d %s" % (port, line))
            stream.flush()


def dial(address: tuple[str, int]) -> tuple[int, socket.socket]:
    """Connect the old-fashioned way and read the slot line one byte at a time."""
    sock = socket.create_connection(address, timeout=5)
    # Unbuffered, so not a byte past the slot line is read.
    with sock.makefile("rb", buffering=0) as raw:
        line = raw.readline(20)
    if not line.endswith(b"\r\n"):
        sock.close()
        raise ConnectionError(f"no slot line from {address}")
    sock.settimeout(None)
    return int(line), sock


def work(client: CallosumClient, number: int, replies: list[str]) -> None:
    """Send one request the way any threaded code would."""
    with client.connection(timeout=5) as sock, sock.makefile("rb") as stream:
        sock.sendall(b"job %d\n" % number)
        replies.append(stream.readline().decode().strip())


def main() -> None:
    servers = [CallosumServer(("127.0.0.1", 0), echo) for _ in range(2)]
    for server in servers:
        server.start()
    client = CallosumClient(max_slots=3)
    try:
        for _ in range(3):
            for server in servers:
                slot, sock = dial(("127.0.0.1", server.server_port))
                kept = client.new_connection(slot, sock)
                print(
                    f"offered slot {slot} of port {server.server_port}: "
                    f"{'kept' if kept else 'turned down'}"
                )
        replies: list[str] = []
        threads = [threading.Thread(target=work, args=(client, n, replies)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print(f"{len(replies)} replies, from ports {sorted({r.split()[0] for r in replies})}")
        print(f"client holds {client.slot_count} connections")
    finally:
        client.close()
        for server in servers:
            server.stop(timeout=1)


if __name__ == "__main__":
    main()
