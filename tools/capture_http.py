"""Record what an HTTP client sends to an OpenAI-style server, and answer just enough for it to go on.

    python tools/capture_http.py OUT_DIR [--port 8765] [--call NAME ARGUMENTS_JSON] [--namespace NS]
        [--reasoning-text TEXT] [--encrypted-content VALUE] [--fail STATUS]

Each request is written to OUT_DIR/NNN-METHOD-path.json as {method, path, headers, redacted_headers,
body}; credential headers are left out (only their names are kept) so captures never hold a key.
POST .../responses is answered with a Responses SSE stream: the first one, when --call is given, with
a reasoning item (a summary, raw `reasoning_text` content when --reasoning-text is given, and
encrypted_content unless it is set to "") and a function_call to NAME (in namespace NS when given),
every other one with a short assistant message, so a client that runs the call sends its result back
once and then stops. With --fail STATUS every Responses request gets that HTTP status and an OpenAI
error body instead. Any other path gets a 404 error body. Standard library only.
"""

import argparse
import itertools
import json
import pathlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Headers that carry credentials; never written to disk.
SECRET_HEADERS = {"authorization", "openai-api-key", "api-key", "cookie"}
FINAL_TEXT = "Captured."
# An opaque stand-in for the reasoning a real server would encrypt; the client must echo it unchanged.
DEFAULT_ENCRYPTED_CONTENT = "capture-stub-opaque-reasoning"


def response_object(response_id, model, output, status):
    """A Responses API `response` object with the fields clients read."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": 0,
        "status": status,
        "model": model,
        "output": output,
        "usage": {
            "input_tokens": 1,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 1,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 2,
        },
    }


def reasoning_item(script):
    """The reasoning item sent before the scripted call."""
    item = {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Calling the tool."}]}
    if script.reasoning_text:
        item["content"] = [{"type": "reasoning_text", "text": script.reasoning_text}]
    if script.encrypted_content:
        item["encrypted_content"] = script.encrypted_content
    return item


def output_items(number, script):
    """The output items of response `number`: a reasoning item and a call first (when asked), else a message."""
    if number == 1 and script.call is not None:
        name, arguments = script.call
        function_call = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": name,
                         "arguments": arguments, "status": "completed"}
        if script.namespace:
            function_call["namespace"] = script.namespace
        return [reasoning_item(script), function_call]
    return [{"type": "message", "id": f"msg_{number}", "role": "assistant", "status": "completed",
             "content": [{"type": "output_text", "text": FINAL_TEXT, "annotations": []}]}]


def sse_events(number, model, script):
    """The SSE events of response `number`, each as (event type, data)."""
    response_id = f"resp_{number}"
    items = output_items(number, script)
    yield "response.created", {"type": "response.created",
                               "response": response_object(response_id, model, [], "in_progress")}
    for index, item in enumerate(items):
        yield "response.output_item.added", {"type": "response.output_item.added", "output_index": index,
                                             "item": item}
        yield "response.output_item.done", {"type": "response.output_item.done", "output_index": index,
                                            "item": item}
    yield "response.completed", {"type": "response.completed",
                                 "response": response_object(response_id, model, items, "completed")}


class CaptureHandler(BaseHTTPRequestHandler):
    server_version = "capture_http"

    def do_GET(self):
        self.record(None)
        self.send_error_body(404, f"{self.path} is not served by the capture stub")

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.loads(raw) if raw else None
        number = self.record(body)
        if not self.path.rstrip("/").endswith("/responses"):
            self.send_error_body(404, f"{self.path} is not served by the capture stub")
            return
        if self.server.script.fail:
            self.send_error_body(self.server.script.fail, "the capture stub was told to refuse this request")
            print(f"request {number}: answered HTTP {self.server.script.fail}", flush=True)
            return
        with self.server.lock:
            response_number = next(self.server.response_numbers)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        model = (body or {}).get("model", "stub")
        for event, data in sse_events(response_number, model, self.server.script):
            self.wfile.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()
        self.close_connection = True
        print(f"request {number}: answered response {response_number}", flush=True)

    def record(self, body):
        """Write this request to the capture folder; return its number."""
        with self.server.lock:
            number = next(self.server.request_numbers)
        headers = {k.lower(): v for k, v in self.headers.items() if k.lower() not in SECRET_HEADERS}
        redacted = sorted(k.lower() for k in self.headers.keys() if k.lower() in SECRET_HEADERS)
        slug = self.path.strip("/").replace("/", "_").split("?")[0] or "root"
        path = self.server.out_dir / f"{number:03d}-{self.command}-{slug}.json"
        path.write_text(json.dumps({"method": self.command, "path": self.path, "headers": headers,
                                    "redacted_headers": redacted, "body": body}, indent=2) + "\n")
        print(f"request {number}: {self.command} {self.path} -> {path.name}", flush=True)
        return number

    def send_error_body(self, status, message):
        """An error in OpenAI's shape."""
        kind = "invalid_request_error" if status < 500 else "server_error"
        data = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--call", nargs=2, metavar=("NAME", "ARGUMENTS_JSON"),
                        help="answer the first Responses request with a call to this function")
    parser.add_argument("--namespace", help="put the --call in this namespace (a `namespace` field)")
    parser.add_argument("--reasoning-text", help="raw reasoning sent as the reasoning item's reasoning_text content")
    parser.add_argument("--encrypted-content", default=DEFAULT_ENCRYPTED_CONTENT,
                        help='the reasoning item\'s encrypted_content ("" leaves the field out)')
    parser.add_argument("--fail", type=int, metavar="STATUS", help="answer every Responses request with this status")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), CaptureHandler)
    server.out_dir = args.out_dir
    server.script = args
    server.lock = threading.Lock()
    server.request_numbers = itertools.count(1)
    server.response_numbers = itertools.count(1)
    print(f"capturing on http://127.0.0.1:{args.port} into {args.out_dir}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
