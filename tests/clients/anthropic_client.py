"""Drives a running Tollgate gateway with the official `anthropic` Python SDK.

Usage: anthropic_client.py BASE_URL API_KEY. Prints one JSON object with what each call
returned; exits non-zero with a message on the first failure.
"""

import json
import sys

import anthropic


def main() -> None:
    base_url, key = sys.argv[1], sys.argv[2]
    client = anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=0, timeout=20)
    out = {}

    message = client.messages.create(
        model="demo-chat",
        max_tokens=100,
        system="You are terse.",
        messages=[{"role": "user", "content": "Hello from the Anthropic SDK"}],
    )
    out["message"] = {
        "text": message.content[0].text,
        "stop_reason": message.stop_reason,
        "output_tokens": message.usage.output_tokens,
    }

    with client.messages.stream(
        model="demo-chat", max_tokens=100, messages=[{"role": "user", "content": "Stream please"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    out["stream"] = {"text": text, "stop_reason": final.stop_reason, "output_tokens": final.usage.output_tokens}

    errors = {}
    try:
        client.messages.create(model="no-such-model", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    except anthropic.NotFoundError as e:
        errors["not_found"] = e.status_code
    try:
        anthropic.Anthropic(base_url=base_url, api_key="tg_wrong_key_000000000000000", max_retries=0).messages.create(
            model="demo-chat", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    except anthropic.AuthenticationError as e:
        errors["auth"] = e.status_code
    out["errors"] = errors

    print(json.dumps(out))


if __name__ == "__main__":
    main()
