"""FaultyProxy: a real HTTP proxy in front of an S3 endpoint that answers 500 InternalError while told to fail."""

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

INTERNAL_ERROR = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message></Error>"
)
_BLOCK = 1 << 20


class FaultyProxy:
    """An HTTP proxy in front of an S3 endpoint that answers 500 InternalError while told to fail."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname, parts.port or 80)
        self._fail_until = 0.0
        self._lock = threading.Lock()
        self.failed_requests = 0
        self.connections = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-proxy", daemon=True)

    def fail_for(self, seconds: float) -> None:
        """Answer 500 for this long from now (math.inf: until told otherwise); 0 stops failing."""
        self._fail_until = time.monotonic() + seconds

    def _should_fail(self) -> bool:
        if time.monotonic() >= self._fail_until:
            return False
        with self._lock:
            self.failed_requests += 1
        return True

    def _connected(self) -> None:
        with self._lock:
            self.connections += 1

    def __enter__(self) -> "FaultyProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.server.proxy._connected()

    def log_message(self, format, *args) -> None:
        pass  # one stderr line per request would bury the test output

    def do_request(self) -> None:
        proxy: FaultyProxy = self.server.proxy
        # The whole body is read first, so that a 500 is a clean answer on a connection that stays usable.
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        body = self._read_chunked() if chunked else self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if proxy._should_fail():
            self.send_response(500)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(INTERNAL_ERROR)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(INTERNAL_ERROR)
            return
        upstream = http.client.HTTPConnection(*proxy._upstream, timeout=120)
        try:
            self._forward(upstream, body, chunked)
        finally:
            upstream.close()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_request

    def _read_chunked(self) -> bytes:
        body = bytearray()
        while size := int(self.rfile.readline().split(b";")[0], 16):
            body += self.rfile.read(size)
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return bytes(body)

    def _forward(self, upstream: http.client.HTTPConnection, body: bytes, chunked: bool) -> None:
        # The clients sign the Host header (SigV4): every header goes on exactly as the client sent it.
        upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            if not (chunked and name.lower() == "transfer-encoding"):
                upstream.putheader(name, value)
        if chunked:
            upstream.putheader("Content-Length", str(len(body)))
        upstream.endheaders(body or None)
        response = upstream.getresponse()
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        if response.chunked:
            while block := response.read1(_BLOCK):
                self.wfile.write(b"%X\r\n%s\r\n" % (len(block), block))
            self.wfile.write(b"0\r\n\r\n")
            return
        if response.length is None:  # delimited by the upstream closing: so must this answer be
            self.close_connection = True
        while block := response.read(_BLOCK):
            self.wfile.write(block)
