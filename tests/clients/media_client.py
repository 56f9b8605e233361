"""Drives a running Tollgate gateway's moderations, images and audio endpoints with the
official `openai` SDK, as applications call them.

Usage: media_client.py BASE_URL API_KEY. Prints one JSON object with what each call
returned; exits non-zero with a message on the first failure.
"""

import json
import sys

import openai


def main() -> None:
    base, key = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    out = {}

    # The SDK's default moderation model is OpenAI's: no model named.
    moderation = client.moderations.create(input=["hello", "I will kill the process"])
    out["moderation"] = [r.flagged for r in moderation.results]

    image = client.images.generate(model="gpt-image", prompt="a lighthouse", n=1)
    out["image"] = {
        "count": len(image.data),
        "b64": bool(image.data[0].b64_json),
        "output_tokens": image.usage.output_tokens if image.usage else None,
    }
    events = client.images.generate(
        model="gpt-image", prompt="a lighthouse", stream=True, partial_images=1
    )
    out["image_stream"] = [e.type for e in events]

    # Audio streamed to the caller as it is generated.
    with client.audio.speech.with_streaming_response.create(
        model="tts", voice="alloy", input="Hello from the SDK", response_format="mp3"
    ) as response:
        audio = b"".join(response.iter_bytes(chunk_size=4096))
    out["speech"] = {"bytes": len(audio), "head": audio[:3].decode("latin-1")}

    upload = ("meeting.wav", b"RIFF" + bytes(range(256)) * 40, "audio/wav")
    transcript = client.audio.transcriptions.create(model="transcribe", file=upload)
    out["transcript"] = transcript.text
    stream = client.audio.transcriptions.create(
        model="transcribe", file=upload, stream=True
    )
    kinds = []
    final = None
    for event in stream:
        kinds.append(event.type)
        if event.type == "transcript.text.done":
            final = event.text
    out["transcript_stream"] = {"last": kinds[-1], "deltas": kinds.count("transcript.text.delta"), "text": final}
    text = client.audio.transcriptions.create(
        model="whisper-1", file=upload, response_format="text"
    )
    out["transcript_text"] = text.strip() if isinstance(text, str) else str(text)

    try:
        client.audio.speech.create(model="no-such-model", voice="alloy", input="x")
        out["not_found"] = "no error"
    except openai.NotFoundError as e:
        out["not_found"] = e.code

    print(json.dumps(out))


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # the test prints whatever went wrong
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
