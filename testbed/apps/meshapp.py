#!/usr/bin/env python3
"""An ordinary, mesh-unaware TCP application for tests and the demo.

server: listens on [::]:PORT (IPv4 too) for each PORT; for every connection it
        first sends one JSON line saying what it sees (its local address, the
        peer address), then echoes every byte back until the peer closes.
client: connects, reports getpeername()/getsockname() and the server's line.
        modes: once (send a message, half-close, read the echo), loop (COUNT
        sequential connects, or fewer once --stop-file exists; report
        failures), hold (one connection, a ping
        every INTERVAL for COUNT times).
Every loop is bounded; output is one JSON object on stdout.
"""
import argparse
import hashlib
import os
import json
import socket
import sys
import threading
import time


def addr(a):
    return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"


def canon(a):
    """IPv4 clients of the dual-stack listener, written as IPv4."""
    host = a[0][7:] if a[0].startswith("::ffff:") else a[0]
    return addr((host, a[1]))


def serve_conn(conn):
    with conn:
        hello = {"server_local": canon(conn.getsockname()), "server_peer": canon(conn.getpeername())}
        conn.sendall((json.dumps(hello) + "\n").encode())
        while True:
            data = conn.recv(65536)
            if not data:
                break
            conn.sendall(data)


def server(ports):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks = []
    for port in ports:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", port))
        s.listen(1024)
        socks.append(s)

    def accept(s):
        while True:
            conn, _ = s.accept()
            threading.Thread(target=serve_conn, args=(conn,), daemon=True).start()

    for s in socks[1:]:
        threading.Thread(target=accept, args=(s,), daemon=True).start()
    print(json.dumps({"listening": ports}), flush=True)
    accept(socks[0])


def connect(host, port, family, timeout):
    if family == "mapped":
        fam, host = socket.AF_INET6, "::ffff:" + host
    elif ":" in host:
        fam = socket.AF_INET6
    else:
        fam = socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect((host, port))
    return s


def read_line(s):
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            raise ConnectionError("closed before the server's first line")
        buf += chunk
    return json.loads(buf)


def once(a):
    s = connect(a.host, a.port, a.family, a.timeout)
    out = {"peername": addr(s.getpeername()), "sockname": addr(s.getsockname())}
    out["server"] = read_line(s)
    msg = os.urandom(a.size) if a.size else a.message.encode()

    send_error = []

    def send():
        # Send everything, then half-close: the echo must still come back.
        try:
            s.sendall(msg)
            s.shutdown(socket.SHUT_WR)
        except OSError as e:
            # Reported, not lost in a thread: "sent" would claim everything.
            send_error.append(str(e))

    sender = threading.Thread(target=send)
    sender.start()
    echo = hashlib.sha256()
    received = 0
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        echo.update(chunk)
        received += len(chunk)
    sender.join()
    out["sent"] = len(msg)
    if send_error:
        out["send_error"] = send_error[0]
    out["echoed"] = received
    out["echo_ok"] = received == len(msg) and echo.digest() == hashlib.sha256(msg).digest()
    s.close()
    return out


def loop(a):
    ok, errors = 0, []
    for i in range(a.count):
        if a.stop_file and os.path.exists(a.stop_file):
            break
        try:
            a.message = f"ping {i}"
            r = once(a)
            if r["echo_ok"]:
                ok += 1
            else:
                errors.append(f"{i}: bad echo")
        except OSError as e:
            errors.append(f"{i}: {e}")
        time.sleep(a.interval)
    return {"ok": ok, "failed": len(errors), "errors": errors[:20]}


def hold(a):
    s = connect(a.host, a.port, a.family, a.timeout)
    read_line(s)
    print(json.dumps({"connected": True}), flush=True)
    ok = 0
    try:
        for i in range(a.count):
            msg = f"ping {i}\n".encode()
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                chunk = s.recv(len(msg) - len(got))
                if not chunk:
                    raise ConnectionError("connection closed")
                got += chunk
            if got != msg:
                raise ConnectionError("bad echo")
            ok += 1
            time.sleep(a.interval)
        return {"ok": ok, "error": None}
    except OSError as e:
        return {"ok": ok, "error": str(e)}


def burst(a):
    """COUNT connections open at the same time, each echoing its message."""
    import asyncio
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    async def one(i, opened, release):
        r, w = await asyncio.wait_for(asyncio.open_connection(a.host, a.port), a.timeout)
        try:
            await asyncio.wait_for(r.readline(), a.timeout)
            opened.append(i)
            await release.wait()  # all connections are open at once
            msg = f"conn {i}".encode()
            w.write(msg)
            await w.drain()
            w.write_eof()
            echo = await asyncio.wait_for(r.read(), a.timeout)
            return echo == msg
        finally:
            w.close()

    async def run():
        opened, release = [], asyncio.Event()
        tasks = [asyncio.ensure_future(one(i, opened, release)) for i in range(a.count)]
        deadline = asyncio.get_event_loop().time() + a.timeout * 4
        while len(opened) < a.count and asyncio.get_event_loop().time() < deadline:
            if all(t.done() for t in tasks):
                break
            await asyncio.sleep(0.05)
        peak = len(opened)
        # An event for tests: this many are open now (the report comes last).
        print(json.dumps({"open_at_once": peak}), flush=True)
        if a.hold:
            await asyncio.sleep(a.hold)
        release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        ok = sum(1 for x in results if x is True)
        errors = [repr(x) for x in results if x is not True][:5]
        return {"ok": ok, "failed": a.count - ok, "open_at_once": peak, "errors": errors}

    return asyncio.run(run())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["server", "once", "loop", "hold", "burst"])
    p.add_argument("--ports", type=int, nargs="*", default=[8080])
    p.add_argument("--host")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--family", choices=["auto", "mapped"], default="auto")
    p.add_argument("--message", default="hello mesh")
    p.add_argument("--size", type=int, default=0, help="send SIZE random bytes instead of --message")
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--interval", type=float, default=0.05)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--hold", type=float, default=0.0, help="burst: seconds to keep all connections open")
    p.add_argument("--stop-file", help="loop: stop early (still bounded by COUNT) once this file exists")
    a = p.parse_args()
    if a.mode == "server":
        server(a.ports)
        return
    try:
        out = {"once": once, "loop": loop, "hold": hold, "burst": burst}[a.mode](a)
    except OSError as e:
        out = {"error": f"{type(e).__name__}: {e}", "errno": getattr(e, "errno", None)}
    print(json.dumps(out), flush=True)
    sys.exit(0 if "error" not in out or a.mode == "hold" else 1)


if __name__ == "__main__":
    main()
