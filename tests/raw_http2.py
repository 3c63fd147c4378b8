"""A gRPC call over a bare HTTP/2 connection (the h2 package), for what grpc's own clients never
send: header values that are not UTF-8, say."""

from __future__ import annotations

import socket
import struct

import h2.config
import h2.connection
import h2.events
import h2.settings


def call(port: int, method: str, message: bytes, metadata: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """Send one unary request to 127.0.0.1:`port` and return the trailers it ends with (grpc-status...)."""
    connection = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        connection.initiate_connection()
        stream = connection.get_next_available_stream_id()
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", method.encode()),
            (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *metadata,
        ]
        connection.send_headers(stream, headers)
        connection.send_data(stream, b"\x00" + struct.pack(">I", len(message)) + message, end_stream=True)
        sock.sendall(connection.data_to_send())
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection before the call ended")
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                ended = isinstance(event, h2.events.TrailersReceived) or (
                    isinstance(event, h2.events.ResponseReceived) and event.stream_ended is not None
                )
                if ended and event.stream_id == stream:
                    return dict(event.headers)
            sock.sendall(connection.data_to_send())


class UnreadStreams:
    """Calls a client opened and never reads: its connection grants the server no flow-control window,
    so nothing past the first bytes of a response can be sent. Closing the connection ends them."""

    def __init__(self, port: int, method: str, message: bytes, count: int) -> None:
        self._connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        # Sent with the connection preface (a SETTINGS frame before it would end the connection).
        self._connection.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}
        )
        self._connection.initiate_connection()
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        framed = b"\x00" + struct.pack(">I", len(message)) + message
        for _ in range(count):
            stream = self._connection.get_next_available_stream_id()
            self._connection.send_headers(
                stream,
                [
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", method),
                    (":authority", "localhost"),
                    ("content-type", "application/grpc"),
                    ("te", "trailers"),
                ],
            )
            self._connection.send_data(stream, framed, end_stream=True)
        self._sock.sendall(self._connection.data_to_send())

    def close(self) -> None:
        self._sock.close()
