"""Stands in for ``python -m vllm.entrypoints.openai.api_server`` where only the process matters (Ray
placement and node-loss tests): serves ``/health`` and ``/v1/models`` on the ``--host``/``--port`` it is given.

Run through a wrapper named as ``engine.python``: ``fake-python -m vllm... --model m --host h --port p ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-m")
    parser.add_argument("--model", default="fake")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args, _ = parser.parse_known_args(argv)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):  # keep the engine log small
            pass

        def do_GET(self) -> None:
            if self.path == "/health":
                body = b""
            elif self.path == "/v1/models":
                body = json.dumps({"data": [{"id": args.model}]}).encode()
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
