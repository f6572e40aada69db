#!/usr/bin/env python3
"""A minimal client of the rllama inference API that `shardllama serve` speaks: stream one completion.

    shardllama serve &                                # listens on 127.0.0.1:8080
    python3 examples/api_hello_world.py "The meaning of life is"
    python3 examples/api_hello_world.py "Once upon a time" http://127.0.0.1:8080/rllama/v1/inference

The answer is JSONL, one line per generated token, ``{"<text to append>": {"p": <probability>, ...}}``,
sent as soon as the token exists; the keys, joined, are the generated text.  Only the standard library.
"""

import json
import sys
import urllib.error
import urllib.request

URL = "http://127.0.0.1:8080/rllama/v1/inference"


def main() -> int:
    prompt = sys.argv[1] if len(sys.argv) > 1 else "Hello world!"
    url = sys.argv[2] if len(sys.argv) > 2 else URL
    body = {"prompt": prompt, "max_seq_len": 1024, "max_new_tokens": 200, "no_token_sampling": False}
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            print(prompt, end="", flush=True)
            for line in response:  # each line arrives as its token is generated
                (text, info), = json.loads(line).items()
                if text == "error" and isinstance(info, str):  # the generation failed midway
                    print(f"\nerror: {info}", file=sys.stderr)
                    return 1
                print(text, end="", flush=True)
                if info.get("is_end_token"):
                    break
    except urllib.error.HTTPError as e:  # 400 with {"error": "..."}, 503 when the server is busy
        print(f"error {e.code}: {json.loads(e.read()).get('error')}", file=sys.stderr)
        return 1
    except urllib.error.URLError as e:
        print(f"cannot reach {url}: {e.reason} (is `shardllama serve` running?)", file=sys.stderr)
        return 1
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
