"""Command line: ``python -m lowmemws echo --host H --port P [--processes N]``."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import Config
from .connection import Connection
from .server import Gateway


def build_parser() -> argparse.ArgumentParser:
    """build_parser returns the CLI's argument parser."""
    parser = argparse.ArgumentParser(prog="python -m lowmemws", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    echo = sub.add_parser("echo", help="run an echo server (text as text, binary as binary)")
    echo.add_argument("--host", action="append", help="address to listen on (repeatable)")
    echo.add_argument("--port", type=int, default=8080)
    echo.add_argument("--processes", type=int, default=1, help="SO_REUSEPORT worker processes")
    echo.add_argument("--max-message-size", type=int, default=Config.max_message_size)
    echo.add_argument("--ping-interval", type=float, default=Config.ping_interval)
    echo.add_argument(
        "--hook-threads", type=int, default=0, help="threads running on_message (0: inline)"
    )
    echo.add_argument("--certfile", help="PEM certificate chain: serve wss:// (with --keyfile)")
    echo.add_argument("--keyfile", help="PEM private key of --certfile")
    return parser


def run_echo(args: argparse.Namespace) -> None:
    """run_echo serves the echo CLI until SIGTERM/SIGINT."""
    config = Config(
        max_message_size=args.max_message_size,
        ping_interval=args.ping_interval,
        hook_threads=args.hook_threads,
        certfile=args.certfile,
        keyfile=args.keyfile,
    )
    hosts = args.host or ["127.0.0.1"]
    scheme = "wss" if args.certfile else "ws"
    gateway = Gateway(hosts, args.port, processes=args.processes, config=config)

    @gateway.on_message
    def echo(conn: Connection, message: str | bytes) -> None:
        conn.send(message)

    def announce() -> None:
        if gateway.wait_ready(60):
            for host in hosts:
                shown = f"[{host}]" if ":" in host else host
                print(f"listening on {scheme}://{shown}:{gateway.port}", flush=True)

    import threading

    threading.Thread(target=announce, daemon=True).start()
    gateway.run()


def main(argv: list[str] | None = None) -> int:
    """main is the console entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "echo":
        run_echo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
