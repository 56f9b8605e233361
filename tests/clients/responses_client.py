"""Drives a running Tollgate gateway's Responses API with the official `openai` SDK.

Usage: responses_client.py BASE_URL API_KEY MODEL [stateful]. Prints one JSON object
with what each call returned; exits non-zero with a message on the first failure.
`stateful` also continues a stored response and retrieves and deletes it (only upstreams
that keep Responses state can).
"""

import json
import sys

import openai
import pydantic


class Person(pydantic.BaseModel):
    name: str
    age: int


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather of a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


def main() -> None:
    base_url, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
    stateful = len(sys.argv) > 4 and sys.argv[4] == "stateful"
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=20)
    out = {}

    plain = client.responses.create(model=model, instructions="Be brief.", input="Hello from the SDK")
    out["create"] = {
        "id": plain.id,
        "status": plain.status,
        "text": plain.output_text,
        "input_tokens": plain.usage.input_tokens,
        "output_tokens": plain.usage.output_tokens,
    }

    deltas, kinds = [], []
    with client.responses.stream(model=model, input="Stream please") as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    out["stream"] = {"deltas": "".join(deltas), "final": final.output_text, "events": kinds}

    history = [{"role": "user", "content": "Use get_weather for Paris"}]
    first = client.responses.create(model=model, input=history, tools=[WEATHER])
    calls = [item for item in first.output if item.type == "function_call"]
    history += [item.model_dump(exclude_none=True) for item in first.output if item.type != "reasoning"]
    for call in calls:
        args = json.loads(call.arguments)
        history.append(
            {"type": "function_call_output", "call_id": call.call_id, "output": f"sunny in {args['city']}"}
        )
    second = client.responses.create(model=model, input=history, tools=[WEATHER])
    out["tools"] = {"calls": [c.name for c in calls], "answer": second.output_text}

    try:
        parsed = client.responses.parse(model=model, input="Invent a person", text_format=Person)
        out["parsed"] = parsed.output_parsed.model_dump() if parsed.output_parsed else None
    except pydantic.ValidationError:
        out["parsed"] = "not JSON"

    if stateful:
        follow = client.responses.create(model=model, previous_response_id=plain.id, input="And again?")
        fetched = client.responses.retrieve(plain.id)
        items = client.responses.input_items.list(plain.id)
        client.responses.delete(plain.id)
        try:
            client.responses.retrieve(plain.id)
            gone = False
        except openai.NotFoundError:
            gone = True
        out["stateful"] = {
            "follow": follow.output_text,
            "fetched": fetched.id == plain.id,
            "input_items": len(items.data),
            "deleted": gone,
        }

    try:
        client.responses.create(model="no-such-model", input="x")
        out["not_found"] = None
    except openai.NotFoundError as e:
        out["not_found"] = e.code

    print(json.dumps(out))


if __name__ == "__main__":
    main()
