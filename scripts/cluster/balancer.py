#!/usr/bin/env python3
"""A small TCP load balancer for scripts/cluster/run.sh (Python 3.8+, standard library only).

Every sagaflow process takes one --amqp-url and cannot fail over to another node by itself,
so the cluster script points all of them at this balancer. Each new client connection goes to
the next node in turn (round robin, like HAProxy's default), and if that node refuses, to the
next one that accepts: a process whose node was killed reconnects here and lands on a
survivor. A connection is never moved once it is established; when its node dies, the
balancer closes the client side too, and the client sees a lost connection, as it would
without a balancer.

    balancer.py LISTEN_PORT BACKEND_PORT [BACKEND_PORT ...]

Listens on 127.0.0.1 only. Logs one line per connection (which node took it, and when it
ended) to stdout, so the script can say where the processes were connected.
"""

import asyncio
import itertools
import sys
import time

CONNECT_TIMEOUT = 2.0  # seconds: a node that does not accept within this counts as down


def log(msg):
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


async def pipe(reader, writer):
    """Copies one direction until EOF or an error, then closes the other side."""
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def main(listen_port, backends):
    turn = itertools.count()
    ids = itertools.count(1)

    async def handle(client_reader, client_writer):
        cid = next(ids)
        start = next(turn)
        # The nodes in round-robin order from this connection's turn: the first that accepts.
        order = [backends[(start + i) % len(backends)] for i in range(len(backends))]
        for port in order:
            try:
                node_reader, node_writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), CONNECT_TIMEOUT
                )
            except (OSError, asyncio.TimeoutError):
                log(f"conn {cid}: node :{port} refused, trying the next one")
                continue
            log(f"conn {cid}: -> node :{port}")
            await asyncio.gather(
                pipe(client_reader, node_writer), pipe(node_reader, client_writer)
            )
            log(f"conn {cid}: node :{port} closed")
            return
        log(f"conn {cid}: no node accepted; closing")
        client_writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    log(f"listening on 127.0.0.1:{listen_port}, nodes {backends}")
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    try:
        asyncio.run(main(int(sys.argv[1]), [int(p) for p in sys.argv[2:]]))
    except KeyboardInterrupt:
        pass
