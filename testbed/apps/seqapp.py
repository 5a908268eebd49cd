#!/usr/bin/env python3
"""Sequence-checked echo for the sockmap tests: every byte a client sends
says which connection and which offset it is, so a reordered, dropped,
duplicated or misdelivered byte is found in the echo.

server --port P [--greet]: for every connection, optionally one byte "G"
        first (a server that speaks first), then echo until the peer closes.
client --host H --port P: COUNT connections over THREADS threads; each
        writes its payload at once after connect (after the greeting with
        --greet), in WRITES writes, half-closes and checks the echo.
        --load N: N more threads move bulk data through the same path while
        the checked connections run (bounded by --load-bytes each).
        --bind-port P: the client's local port (two pods, one port).
        --wait-go: connect (and read the greeting), print {"connected": true},
        wait for a line on stdin, then send.
        --pingpong: read each write's echo before the next write (a
        request/response protocol), then half-close and expect the end.
        --tail N (with --pingpong): after the exchanges, N more bytes in one
        write, read back only after it; --tail-wait: print
        {"tail_sent": true} and wait for a line on stdin before reading.
Output: one JSON object on stdout; every socket has a timeout.
"""
import argparse
import json
import socket
import struct
import sys
import threading

TIMEOUT = 20


def payload(conn_id, size):
    words = (size + 15) // 16
    return b"".join(struct.pack(">QQ", conn_id, i) for i in range(words))[:size]


def serve_conn(conn, greet):
    with conn:
        if greet:
            conn.sendall(b"G")
        while True:
            data = conn.recv(65536)
            if not data:
                break
            conn.sendall(data)


def server(a):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", a.port))
    s.listen(4096)
    print(json.dumps({"listening": [a.port]}), flush=True)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=serve_conn, args=(conn, a.greet), daemon=True).start()


def recv_exact(s, n):
    out = bytearray()
    while len(out) < n:
        d = s.recv(min(65536, n - len(out)))
        if not d:
            break
        out += d
    return bytes(out)


def one(a, conn_id, go=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    try:
        if a.bind_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", a.bind_port))
        s.connect((a.host, a.port))
        if a.greet and recv_exact(s, 1) != b"G":
            return "no greeting"
        if go is not None:
            go()
        data = payload(conn_id, a.size)
        step = max(1, (len(data) + a.writes - 1) // a.writes)
        if a.pingpong:
            for i in range(0, len(data), step):
                s.sendall(data[i : i + step])
                echo = recv_exact(s, len(data[i : i + step]))
                if echo != data[i : i + step]:
                    return f"connection {conn_id}: echo of bytes {i}.. differs (got {len(echo)} bytes)"
            if a.tail:
                tail = payload(conn_id, a.size + a.tail)[a.size :]
                s.sendall(tail)
                if a.tail_wait:
                    print(json.dumps({"tail_sent": True}), flush=True)
                    sys.stdin.readline()
                echo = recv_exact(s, len(tail))
                if echo != tail:
                    return f"connection {conn_id}: echo of the tail differs (got {len(echo)} of {len(tail)} bytes)"
            s.shutdown(socket.SHUT_WR)
            rest = recv_exact(s, 1)
            return f"connection {conn_id}: {len(rest)} bytes after the echo" if rest else None
        for i in range(0, len(data), step):
            s.sendall(data[i : i + step])
        s.shutdown(socket.SHUT_WR)
        echo = recv_exact(s, len(data) + 1)
        if echo != data:
            at = next((i for i, (x, y) in enumerate(zip(echo, data)) if x != y), min(len(echo), len(data)))
            return (
                f"connection {conn_id}: echo differs (got {len(echo)} of {len(data)} bytes), first at {at}: "
                f"got {echo[at:at + 8].hex()} for {data[at:at + 8].hex()}"
            )
        return None
    except OSError as e:
        return f"connection {conn_id}: {e}"
    finally:
        s.close()


def load(a, stop, errors):
    """Bulk echo connections until `stop` (bounded by --load-bytes each)."""
    n = 0
    while not stop.is_set() and n < 10000:
        n += 1
        big = argparse.Namespace(
            **{**vars(a), "size": a.load_bytes, "writes": 16, "greet": a.greet, "bind_port": 0, "pingpong": False}
        )
        err = one(big, 1_000_000 + n)
        if err:
            errors.append("load " + err)
            return


def client(a):
    if a.wait_go:
        def go():
            print(json.dumps({"connected": True}), flush=True)
            sys.stdin.readline()
        err = one(a, a.id, go)
        print(json.dumps({"conns": 1, "failed": int(err is not None), "errors": [err] if err else []}))
        sys.exit(1 if err else 0)
    errors, lock = [], threading.Lock()
    stop = threading.Event()
    load_errors = []
    loaders = [threading.Thread(target=load, args=(a, stop, load_errors)) for _ in range(a.load)]
    for t in loaders:
        t.start()
    ids = iter(range(a.id * 1_000_000, a.id * 1_000_000 + a.count))

    def work():
        while True:
            with lock:
                i = next(ids, None)
            if i is None:
                return
            err = one(a, i)
            if err:
                with lock:
                    errors.append(err)

    workers = [threading.Thread(target=work) for _ in range(a.threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    for t in loaders:
        t.join()
    out = {"conns": a.count, "failed": len(errors), "errors": errors[:5], "load_errors": load_errors[:5]}
    print(json.dumps(out))
    sys.exit(1 if errors or load_errors else 0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["server", "client"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--greet", action="store_true")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--writes", type=int, default=4)
    p.add_argument("--load", type=int, default=0)
    p.add_argument("--load-bytes", type=int, default=1 << 20)
    p.add_argument("--bind-port", type=int, default=0)
    p.add_argument("--wait-go", action="store_true")
    p.add_argument("--pingpong", action="store_true")
    p.add_argument("--tail", type=int, default=0)
    p.add_argument("--tail-wait", action="store_true")
    p.add_argument("--id", type=int, default=1)
    a = p.parse_args()
    server(a) if a.mode == "server" else client(a)


if __name__ == "__main__":
    main()
