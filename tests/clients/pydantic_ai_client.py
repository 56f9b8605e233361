"""Drives a running Tollgate gateway with pydantic-ai's Responses model
(`OpenAIResponsesModel`), as its users run agents on it.

Usage: pydantic_ai_client.py BASE_URL API_KEY MODEL. Prints one JSON object with what each
run returned; exits non-zero with a message on the first failure.
"""

import asyncio
import json
import sys

import pydantic
from pydantic_ai import Agent, NativeOutput
from pydantic_ai.models.openai import OpenAIResponsesModel
from pydantic_ai.providers.openai import OpenAIProvider


class Person(pydantic.BaseModel):
    name: str
    age: int


async def main() -> None:
    base, key, name = sys.argv[1], sys.argv[2], sys.argv[3]
    provider = OpenAIProvider(base_url=f"{base}/v1", api_key=key)
    model = OpenAIResponsesModel(name, provider=provider)
    out = {}

    plain = await Agent(model).run("Hello from pydantic-ai")
    out["plain"] = plain.output
    out["input_tokens"] = plain.usage().input_tokens

    agent = Agent(model)

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """The weather of a city."""
        return f"sunny in {city}"

    looped = await agent.run("Use get_weather for Paris")
    out["tool_loop"] = looped.output
    out["tool_calls"] = [
        part.tool_name
        for message in looped.all_messages()
        for part in message.parts
        if part.part_kind == "tool-call"
    ]

    structured = await Agent(model, output_type=NativeOutput(Person)).run("Invent a person")
    out["structured"] = structured.output.model_dump()

    async with Agent(model).run_stream("Stream please") as streamed:
        out["streamed"] = await streamed.get_output()

    print(json.dumps(out))


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Exception as e:  # the test prints whatever went wrong
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
