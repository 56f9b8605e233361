"""Runs an OpenAI Agents SDK agent with a function tool through a Tollgate gateway.

Usage: agents_client.py BASE_URL API_KEY MODEL. The agent uses the SDK's default model
API (the Responses API). Prints one JSON object: the final output and the tool calls the
run made; exits non-zero on failure.
"""

import json
import sys

from agents import Agent, Runner, function_tool, set_default_openai_client, set_tracing_disabled
from openai import AsyncOpenAI

CALLS = []


@function_tool
def get_weather(city: str) -> str:
    """The weather of a city."""
    CALLS.append(city)
    return f"sunny in {city}"


def main() -> None:
    base_url, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
    set_tracing_disabled(True)
    set_default_openai_client(AsyncOpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0))
    agent = Agent(name="weather", instructions="Answer with the tool.", model=model, tools=[get_weather])
    result = Runner.run_sync(agent, "Use get_weather for Paris")
    print(json.dumps({"final": result.final_output, "calls": CALLS}))


if __name__ == "__main__":
    main()
