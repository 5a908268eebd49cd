#!/usr/bin/env python3
"""An independent HBONE peer (Python `ssl` + the `h2` package) for
wire-compatibility tests of the agent: none of the agent's code is used.

client: TCP to --connect, TLS 1.3 only, ALPN h2, client certificate, no SNI;
        verifies the server chain against --ca and that the server's URI SAN
        is --expect-id; one CONNECT stream to --authority with `forwarded`,
        `baggage` and `traceparent`; requires 200, sends the message as DATA,
        half-closes (END_STREAM) and reads the echo until the server ends the
        stream (--streams N: N such streams at once on the one connection).
        Prints one JSON line. Exit 0 on 200, 1 on another status,
        2 when the connection failed (TLS refused, reset, timeout).
server: listens on --listen (dual stack), TLS 1.3, ALPN h2, requires a client
        certificate chained to --ca whose URI SAN is in --trust-domain (else
        closes); answers every CONNECT with 200 and echoes each DATA chunk on
        the same stream, ending it when the client does. Prints one JSON line
        when listening, then one per finished stream. Runs until killed.

Flow control is honoured both ways: received data is acknowledged (the
server only after echoing it, so a reader that stops reading stops the
writer), and DATA is sent only within the peer's stream and connection
windows and its maximum frame size.
"""
import argparse
import asyncio
import hashlib
import json
import os
import re
import secrets
import socket
import ssl
import sys

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings


def hostport(s):
    host, _, port = s.rpartition(":")
    return host.strip("[]"), int(port)


def uri_sans(cert):
    return [v for k, v in (cert or {}).get("subjectAltName", ()) if k == "URI"]


def tls_context(server_side, cert, key, ca):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # identity is the URI SAN, checked below
    ctx.verify_mode = ssl.CERT_REQUIRED  # on the server: a client certificate is required
    ctx.load_verify_locations(cafile=ca)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    return ctx


def tls_facts(sslobj):
    return {
        "tls": sslobj.version(),
        "cipher": sslobj.cipher()[0],
        "alpn": sslobj.selected_alpn_protocol(),
    }


class Stream:
    def __init__(self, sid):
        self.sid = sid
        self.queue = asyncio.Queue()  # (data, flow-controlled length), then None or an exception
        self.response = asyncio.get_running_loop().create_future()
        self.headers = {}
        self.received = 0


class Peer:
    """One HTTP/2 connection over an established TLS stream; all h2 state is
    touched from this one event loop only."""

    def __init__(self, reader, writer, client_side, on_request=None):
        self.reader, self.writer = reader, writer
        cfg = h2.config.H2Configuration(client_side=client_side, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=cfg)
        self.on_request = on_request
        self.streams = {}
        self.window = asyncio.Event()  # replaced after every window change
        self.lock = asyncio.Lock()
        self.closed = None

    async def flush(self):
        data = self.conn.data_to_send()
        if data:
            async with self.lock:
                self.writer.write(data)
                await self.writer.drain()

    async def start(self):
        self.conn.initiate_connection()
        await self.flush()

    def _window_changed(self):
        self.window.set()
        self.window = asyncio.Event()

    def _fail_all(self, err):
        self.closed = err
        for s in self.streams.values():
            s.queue.put_nowait(err)
            if not s.response.done():
                s.response.set_exception(err)
        self._window_changed()

    async def run(self):
        """Reads frames until the connection ends."""
        try:
            while True:
                data = await self.reader.read(1 << 16)
                if not data:
                    raise ConnectionError("connection closed by the peer")
                for ev in self.conn.receive_data(data):
                    self._event(ev)
                await self.flush()
        except Exception as e:  # noqa: BLE001 - every end of the connection ends its streams
            self._fail_all(e if isinstance(e, ConnectionError) else ConnectionError(repr(e)))
        finally:
            self.writer.close()

    def _event(self, ev):
        if isinstance(ev, h2.events.RequestReceived):
            s = self.streams[ev.stream_id] = Stream(ev.stream_id)
            s.headers = {k.decode(): v.decode() for k, v in ev.headers}
            if self.on_request:
                asyncio.get_running_loop().create_task(self.on_request(self, s))
        elif isinstance(ev, h2.events.ResponseReceived):
            s = self.streams.get(ev.stream_id)
            if s and not s.response.done():
                s.response.set_result({k.decode(): v.decode() for k, v in ev.headers})
        elif isinstance(ev, h2.events.DataReceived):
            s = self.streams.get(ev.stream_id)
            if s:
                s.received += len(ev.data)
                s.queue.put_nowait((ev.data, ev.flow_controlled_length))
            elif ev.flow_controlled_length:
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded):
            s = self.streams.get(ev.stream_id)
            if s:
                s.queue.put_nowait(None)
        elif isinstance(ev, h2.events.StreamReset):
            s = self.streams.get(ev.stream_id)
            if s:
                err = ConnectionResetError(f"stream reset by the peer (error code {ev.error_code})")
                s.queue.put_nowait(err)
                if not s.response.done():
                    s.response.set_exception(err)
            self._window_changed()
        elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self._window_changed()
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._fail_all(ConnectionError(f"GOAWAY (error code {ev.error_code})"))

    async def send(self, sid, data, timeout):
        """DATA within the peer's windows and frame size."""
        view = memoryview(data)
        while view:
            if self.closed:
                raise self.closed
            window = self.conn.local_flow_control_window(sid)
            if window <= 0:
                await asyncio.wait_for(self.window.wait(), timeout)
                continue
            n = min(window, self.conn.max_outbound_frame_size, len(view))
            self.conn.send_data(sid, bytes(view[:n]))
            view = view[n:]
            await self.flush()

    def remote_settings(self):
        rs = self.conn.remote_settings
        return {
            "max_concurrent_streams": rs.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS),
            "initial_window_size": rs.initial_window_size,
            "max_frame_size": rs.max_frame_size,
        }


# --- client -------------------------------------------------------------


async def client(a):
    host, port = hostport(a.connect)
    ctx = tls_context(False, a.cert, a.key, a.ca)
    # server_hostname="" disables both SNI and the host name check.
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname="")
    sslobj = writer.get_extra_info("ssl_object")
    out = tls_facts(sslobj)
    ids = uri_sans(sslobj.getpeercert())
    out["peer_id"] = ids[0] if len(ids) == 1 else ids
    if out["alpn"] != "h2":
        raise ConnectionError(f"server did not select ALPN h2: {out['alpn']}")
    if ids != [a.expect_id]:
        raise ConnectionError(f"server identity {ids} is not {a.expect_id}")
    peer = Peer(reader, writer, client_side=True)
    await peer.start()
    reading = asyncio.get_running_loop().create_task(peer.run())
    try:
        # --streams N: N concurrent CONNECTs sharing this one TLS connection.
        results = await asyncio.gather(*(one_stream(peer, a) for _ in range(a.streams)))
    finally:
        reading.cancel()
        writer.close()
    first = results[0]
    out.update(first)
    out["server_settings"] = peer.remote_settings()
    bad = [r["status"] for r in results if r["status"] != 200]
    out["status"] = bad[0] if bad else 200
    if a.streams > 1:
        out["streams"] = len(results)
        out["streams_ok"] = sum(1 for r in results if r.get("echo_ok"))
    return out


async def one_stream(peer, a):
    sid = peer.conn.get_next_available_stream_id()
    s = peer.streams[sid] = Stream(sid)
    headers = [
        (":method", "CONNECT"),
        (":authority", a.authority),
        ("forwarded", f'for="{a.forwarded_for}"'),
        ("baggage", "k8s.cluster.name=interop,k8s.namespace.name=default,"
                    "k8s.deployment.name=hbone-peer,service.name=hbone-peer,service.version=v1"),
        ("traceparent", f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00"),
    ]
    peer.conn.send_headers(sid, [(k.encode(), v.encode()) for k, v in headers])
    await peer.flush()
    resp = await asyncio.wait_for(s.response, a.timeout)
    out = {"status": int(resp.get(":status", "0")), "response_headers": resp}
    if out["status"] != 200:
        return out

    msg = (a.message.encode() * a.repeat) if a.message is not None else os.urandom(a.size)
    echo = bytearray()

    async def receive():
        while True:
            item = await s.queue.get()
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            data, flen = item
            echo.extend(data)
            if flen:
                peer.conn.acknowledge_received_data(flen, sid)
                await peer.flush()

    receiving = asyncio.get_running_loop().create_task(receive())
    await peer.send(sid, msg, a.timeout)
    peer.conn.end_stream(sid)  # half-close: the echo must still come back
    await peer.flush()
    await asyncio.wait_for(receiving, a.timeout)
    body = bytes(echo)
    if a.skip_line:
        line, _, body = body.partition(b"\n")
        out["first_line"] = line.decode(errors="replace")
    out["sent"] = len(msg)
    out["echoed"] = len(body)
    out["echo_ok"] = body == msg
    if a.message is not None and len(msg) <= 4096:
        out["echo"] = body.decode(errors="replace")
    else:
        out["echo_sha256"] = hashlib.sha256(body).hexdigest()
    return out


# --- server -------------------------------------------------------------


def print_line(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def serve_stream(peer, s, conn_facts):
    sid, h = s.sid, s.headers
    record = {
        "authority": h.get(":authority"),
        "method": h.get(":method"),
        "pseudo": sorted(k for k in h if k.startswith(":")),
        "forwarded": h.get("forwarded"),
        "baggage": h.get("baggage"),
        "traceparent": h.get("traceparent"),
        "headers": {k: v for k, v in h.items() if not k.startswith(":")},
        **conn_facts,
    }
    try:
        if h.get(":method") != "CONNECT":
            peer.conn.send_headers(sid, [(b":status", b"405")], end_stream=True)
            await peer.flush()
            record["status"] = 405
            return
        peer.conn.send_headers(sid, [(b":status", b"200")])
        await peer.flush()
        record["status"] = 200
        while True:
            item = await s.queue.get()
            if item is None:
                break
            if isinstance(item, Exception):
                raise item
            data, flen = item
            await peer.send(sid, data, 30)
            # Acknowledge only what was echoed: a client that does not read
            # stops being able to send.
            if flen:
                peer.conn.acknowledge_received_data(flen, sid)
                await peer.flush()
        peer.conn.end_stream(sid)
        await peer.flush()
    except Exception as e:  # noqa: BLE001 - reported in the stream's line
        record["error"] = repr(e)
        try:
            peer.conn.reset_stream(sid)
            await peer.flush()
        except Exception:  # noqa: BLE001
            pass
    finally:
        record["bytes"] = s.received
        peer.streams.pop(sid, None)
        print_line(record)


async def server(a):
    host, port = hostport(a.listen)
    ctx = tls_context(True, a.cert, a.key, a.ca)
    sni = {}

    def on_sni(sslobj, name, _ctx):
        sni[id(sslobj)] = name

    ctx.sni_callback = on_sni
    # Exactly spiffe://<td>/ns/<ns>/sa/<sa>: a node credential is no workload.
    shape = re.compile(r"spiffe://%s/ns/[^/]+/sa/[^/]+" % re.escape(a.trust_domain))

    async def on_conn(reader, writer):
        sslobj = writer.get_extra_info("ssl_object")
        facts = tls_facts(sslobj)
        facts["sni"] = sni.pop(id(sslobj), None)
        # The TLS 1.3 suites the client offered (that OpenSSL also knows).
        facts["offered"] = [c[0] for c in sslobj.shared_ciphers() or [] if c[1] == "TLSv1.3"]
        ids = uri_sans(sslobj.getpeercert())
        facts["peer_id"] = ids[0] if len(ids) == 1 else ids
        facts["remote"] = "%s:%s" % writer.get_extra_info("peername")[:2]
        if facts["alpn"] != "h2" or len(ids) != 1 or not shape.fullmatch(ids[0]):
            print_line({"refused": facts})
            writer.close()
            return
        peer = Peer(reader, writer, client_side=False, on_request=lambda p, s: serve_stream(p, s, facts))
        await peer.start()
        await peer.run()

    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM)
    if fam == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    srv = await asyncio.start_server(on_conn, sock=sock, ssl=ctx, ssl_handshake_timeout=10)
    print_line({"listening": a.listen})
    async with srv:
        await srv.serve_forever()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("client")
    c.add_argument("--connect", required=True, help="IP:15008")
    c.add_argument("--authority", required=True, help="final destination IP:PORT")
    c.add_argument("--expect-id", required=True)
    c.add_argument("--message", help="the payload (repeated --repeat times)")
    c.add_argument("--repeat", type=int, default=1)
    c.add_argument("--size", type=int, default=0, help="random payload of this size instead")
    c.add_argument("--streams", type=int, default=1, help="concurrent CONNECTs on one connection")
    c.add_argument("--skip-line", action="store_true", help="the server sends one line before echoing")
    c.add_argument("--forwarded-for", default="192.0.2.1:40000")
    c.add_argument("--timeout", type=float, default=20)
    s = sub.add_parser("server")
    s.add_argument("--listen", default="[::]:15008")
    s.add_argument("--trust-domain", default="cluster.local")
    for q in (c, s):
        q.add_argument("--cert", required=True, help="PEM chain, leaf first")
        q.add_argument("--key", required=True)
        q.add_argument("--ca", required=True, help="the mesh root")
    a = p.parse_args()
    if a.mode == "server":
        asyncio.run(server(a))
        return 0
    if a.message is None and not a.size:
        p.error("client needs --message or --size")
    try:
        out = asyncio.run(asyncio.wait_for(client(a), a.timeout))
    except (OSError, asyncio.TimeoutError, ssl.SSLError, h2.exceptions.H2Error) as e:
        print_line({"error": f"{type(e).__name__}: {e}"})
        return 2
    print_line(out)
    return 0 if out.get("status") == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
