"""Request heads shared by the codec tests and the codec benchmarks."""

from __future__ import annotations

#: BROWSER_REQUEST is a WebSocket upgrade as a current Chromium sends it, cookies included.
BROWSER_REQUEST = (
    b"GET /notify?user=42&v=3 HTTP/1.1\r\n"
    b"Host: mail.example.com\r\n"
    b"Connection: keep-alive, Upgrade\r\n"
    b"Pragma: no-cache\r\n"
    b"Cache-Control: no-cache\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    b"Chrome/131.0.0.0 Safari/537.36\r\n"
    b"Upgrade: websocket\r\n"
    b"Origin: https://mail.example.com\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Accept-Encoding: gzip, deflate, br, zstd\r\n"
    b"Accept-Language: en-US,en;q=0.9,fr;q=0.8\r\n"
    b"Cookie: session=3f2a9c1e8b7d4a60b5e1c2d3f4a5b6c7; theme=dark; "
    b"_ga=GA1.2.1234567890.1700000000; csrftoken=Zx8Yw7Vu6Ts5Rq4Po3Nm2Lk1\r\n"
    b"Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    b"\r\n"
)
