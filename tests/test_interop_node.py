"""The wire format against peers written in JavaScript, on Node.js.

The original npm packages (callosum-client-tcp, callosum-server-tcp) are not
in the registry this project's machines reach, so these peers are small
Node.js programs of our own that follow those packages' README: the server
sends each new connection its lowest free slot as the first line, the client
reads that line before anything else. They show that nothing Python-specific
crept into the protocol: our server with ``weight="auto"`` and request
boundaries serves a Node client, and our rover and client pool connections
from a Node server.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import gevent
import pytest

from callosum_gevent import CallosumClient, CallosumServer, Rover
from callosum_gevent._lineproto import LineService, call

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="needs Node.js (node) on PATH")

# A client as callosum-client-tcp's README describes it: read the slot line,
# then use the socket. Prints one line per connection: "<slot> <reply>".
NODE_CLIENT = r"""
const net = require("net");
const [port, count] = [Number(process.argv[1]), Number(process.argv[2])];
const socks = [];
let done = 0;
for (let i = 0; i < count; i++) {
  const sock = net.connect(port, "127.0.0.1");
  socks.push(sock);
  let buf = "", slot = null;
  sock.on("data", (chunk) => {
    buf += chunk.toString("ascii");
    if (slot === null) {
      const end = buf.indexOf("\r\n");
      if (end < 0) return;
      slot = Number(buf.slice(0, end));
      buf = buf.slice(end + 2);
      sock.write("hello" + i + "\n");
    }
    const nl = buf.indexOf("\n");
    if (nl >= 0) {
      console.log(slot + " " + buf.slice(0, nl));
      if (++done === count) socks.forEach((s) => s.end());
    }
  });
}
"""

# A server as callosum-server-tcp's README describes it: the lowest free slot,
# sent as the first line, freed when the connection closes; then a line echo.
NODE_SERVER = r"""
const net = require("net");
const used = new Set();
const server = net.createServer((sock) => {
  let slot = 0;
  while (used.has(slot)) slot++;
  used.add(slot);
  sock.on("close", () => used.delete(slot));
  sock.on("error", () => {});
  sock.write(slot + "\r\n");
  let buf = "";
  sock.on("data", (chunk) => {
    buf += chunk.toString("utf8");
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {
      sock.write("node " + buf.slice(0, nl) + "\n");
      buf = buf.slice(nl + 1);
    }
  });
});
server.listen(0, "127.0.0.1", () => console.log(server.address().port));
"""


@pytest.mark.timeout(30)
def test_a_node_client_reads_our_slot_lines_and_is_served() -> None:
    service = LineService("py")
    server = CallosumServer(("127.0.0.1", 0), service, weight="auto", marks_requests=True)
    service.server = server
    server.start()
    try:
        assert NODE is not None
        node = subprocess.Popen(
            [NODE, "-e", NODE_CLIENT, str(server.server_port), "3"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # The Node process runs beside this hub: let the server greenlets run.
        while node.poll() is None:
            gevent.sleep(0.02)
        out, err = node.communicate()
        assert node.returncode == 0, err
        lines = sorted(out.split("\n")[:-1])
        slots = sorted(int(line.split()[0]) for line in lines)
        assert slots == [0, 1, 2]  # each connection its lowest free slot
        assert sorted(line.split(" ", 1)[1] for line in lines) == [f"py hello{i}" for i in range(3)]
    finally:
        server.stop(timeout=1)


@pytest.mark.timeout(30)
def test_our_rover_and_client_pool_connections_from_a_node_server() -> None:
    assert NODE is not None
    node = subprocess.Popen(
        [NODE, "-e", NODE_SERVER], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    client = CallosumClient(max_slots=3)
    rover: Any = None
    try:
        assert node.stdout is not None
        port = int(node.stdout.readline())
        rover = Rover(client, {"node": ("127.0.0.1", port)}, interval=0.05)
        rover.start()
        with gevent.Timeout(10):
            while client.slot_count < 3:
                gevent.sleep(0.01)
        # The server's slots 0, 1 and 2, each kept once: lend them all at once.
        socks = [client.get_connection(timeout=5) for _ in range(3)]
        for sock in socks:
            client.return_connection(sock)
        server_id, reply = call(client, "ping", timeout=5)
        assert reply == "ping"
        assert server_id == "node"
        assert client.server_stats()["node"]["connections"] == 3
    finally:
        if rover is not None:
            rover.stop()
        client.close()
        node.kill()
        node.communicate()
