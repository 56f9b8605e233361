"""Drives a running Tollgate gateway with the official `openai` Python SDK.

Usage: openai_client.py BASE_URL API_KEY. Prints one JSON object with what each call
returned; exits non-zero with a message on the first failure.
"""

import json
import sys

import openai


def main() -> None:
    base_url, key = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=20)
    out = {}

    chat = client.chat.completions.create(
        model="demo-chat", messages=[{"role": "user", "content": "Hello from the SDK"}]
    )
    out["chat"] = {
        "content": chat.choices[0].message.content,
        "finish_reason": chat.choices[0].finish_reason,
        "total_tokens": chat.usage.total_tokens,
    }

    pieces, usage, chunks = [], None, 0
    with client.chat.completions.create(
        model="demo-chat",
        messages=[{"role": "user", "content": "Stream please"}],
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        for chunk in stream:
            chunks += 1
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if chunk.usage:
                usage = chunk.usage.completion_tokens
    out["stream"] = {"content": "".join(pieces), "chunks": chunks, "completion_tokens": usage}

    # The SDK asks for base64 and decodes it itself.
    emb = client.embeddings.create(model="demo-embed", input=["one", "two"])
    out["embeddings"] = {"count": len(emb.data), "dims": len(emb.data[0].embedding)}

    completion = client.completions.create(model="demo-chat", prompt="Once upon a time")
    out["completion"] = {"text": completion.choices[0].text}

    out["models"] = sorted(m.id for m in client.models.list())

    errors = {}
    try:
        client.chat.completions.create(model="no-such-model", messages=[])
    except openai.NotFoundError as e:
        errors["not_found"] = e.code
    try:
        client.chat.completions.create(model="gpt-4o", messages=[])
    except openai.PermissionDeniedError as e:
        errors["permission"] = e.code
    try:
        openai.OpenAI(base_url=f"{base_url}/v1", api_key="tg_wrong_key_000000000000000", max_retries=0).models.list()
    except openai.AuthenticationError as e:
        errors["auth"] = e.code
    out["errors"] = errors

    print(json.dumps(out))


if __name__ == "__main__":
    main()
