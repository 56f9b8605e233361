//! The few request fields the gateway itself needs, parsed without touching the rest (the
//! original bytes are what gets forwarded).

use std::marker::PhantomData;

use serde::{Deserialize, Deserializer, de};

use crate::error::ApiError;

/// Fields read from an OpenAI-style request body.
#[derive(Debug, Deserialize)]
pub struct RequestHead {
    /// Client-facing model name (a default stands in for a missing one where the API
    /// has one, [`parse_head_for`]).
    #[serde(default)]
    pub model: String,
    /// Whether the client wants SSE.
    #[serde(default)]
    pub stream: bool,
    /// `stream_options`.
    #[serde(default, deserialize_with = "optional_object")]
    pub stream_options: Option<StreamOptions>,
    /// `max_tokens` (or its newer name, or the Responses API's), for token estimates.
    #[serde(default, alias = "max_completion_tokens", alias = "max_output_tokens")]
    pub max_tokens: Option<u64>,
    /// The Responses API's `previous_response_id`: the stored response continued.
    #[serde(default)]
    pub previous_response_id: Option<String>,
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Whether the client asked for the final usage chunk.
    #[serde(default)]
    pub include_usage: bool,
}

impl RequestHead {
    /// Whether the client asked for the usage chunk of a stream.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

/// Parses the head of a JSON body, with errors a client can act on.
pub fn parse_head(body: &[u8]) -> Result<RequestHead, ApiError> {
    parse_head_for(body, None)
}

/// [`parse_head`], with `default_model` standing in for a missing `model` (the APIs
/// where OpenAI makes it optional).
pub fn parse_head_for(body: &[u8], default_model: Option<&str>) -> Result<RequestHead, ApiError> {
    let mut head = parse_any_head(body)?;
    // An empty name counts as none (no model is called "").
    if head.model.is_empty() {
        let Some(default) = default_model else {
            return Err(ApiError::bad_request(
                "You must provide a model parameter.",
                Some("model"),
            ));
        };
        head.model = default.to_owned();
    }
    Ok(head)
}

fn parse_any_head(body: &[u8]) -> Result<RequestHead, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "The request body is empty; send a JSON object.",
            None,
        ));
    }
    // JSON is UTF-8 (RFC 8259); skipped fields would otherwise reach the upstream
    // unchecked.
    if let Err(e) = std::str::from_utf8(body) {
        return Err(ApiError::bad_request(
            format!(
                "The request body is not valid UTF-8 (at byte {}).",
                e.valid_up_to()
            ),
            None,
        ));
    }
    if nesting_exceeds(body, MAX_NESTING) {
        return Err(ApiError::bad_request(
            format!("The request body nests JSON deeper than {MAX_NESTING} levels."),
            None,
        ));
    }
    serde_json::from_slice::<FromObject<RequestHead>>(body)
        .map(|FromObject(head)| head)
        .map_err(|e| {
            let message = e.to_string();
            if message.contains("missing field `model`") {
                ApiError::bad_request("You must provide a model parameter.", Some("model"))
            } else if e.is_syntax() || e.is_eof() {
                ApiError::bad_request(format!("The request body is not valid JSON: {e}"), None)
            } else {
                ApiError::bad_request(format!("Invalid request: {e}"), None)
            }
        })
}

/// `T` read from a JSON object only. Serde's derive also reads a struct from an array
/// (`["gpt-4o", true]`); the gateway's rewrites of the body (`v["model"] = …`,
/// `v["stream_options"]["include_usage"] = …`) would panic on one.
struct FromObject<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for FromObject<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> de::Visitor<'de> for Visit<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map))
            }
        }
        deserializer
            .deserialize_map(Visit(PhantomData))
            .map(FromObject)
    }
}

fn optional_object<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<FromObject<T>>::deserialize(deserializer).map(|o| o.map(|FromObject(v)| v))
}

/// A change to one member of a JSON object (see [`edit_members`]).
#[derive(Debug)]
pub enum Edit<'a> {
    /// Sets the member to this JSON text (added at the end when missing).
    Set(&'a str),
    /// Edits the members of the member, which must be an object (created when missing
    /// or `null`).
    Inside(Vec<(&'a str, Edit<'a>)>),
}

/// `body`, a JSON object, with `edits` applied to its members, every other member
/// copied as it came (no tree is built, whatever the body holds: the memory used is the
/// output, at most the body plus the edits). Keys are matched after unescaping.
pub fn edit_members(body: &[u8], edits: &[(&str, Edit<'_>)]) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::with_capacity(body.len() + 64);
    write_edited(body, edits, &mut out)?;
    Ok(out)
}

fn write_edited(
    body: &[u8],
    edits: &[(&str, Edit<'_>)],
    out: &mut Vec<u8>,
) -> Result<(), serde_json::Error> {
    struct Members<'e, 'o, 'a> {
        edits: &'e [(&'e str, Edit<'a>)],
        out: &'o mut Vec<u8>,
    }
    impl<'de> de::Visitor<'de> for Members<'_, '_, '_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut done = vec![false; self.edits.len()];
            self.out.push(b'{');
            let mut first = true;
            while let Some(key) = map.next_key::<String>()? {
                let raw: &'de serde_json::value::RawValue = map.next_value()?;
                if !first {
                    self.out.push(b',');
                }
                first = false;
                serde_json::to_writer(&mut *self.out, &key).map_err(de::Error::custom)?;
                self.out.push(b':');
                match self.edits.iter().position(|(name, _)| *name == key) {
                    None => self.out.extend_from_slice(raw.get().as_bytes()),
                    Some(i) => {
                        done[i] = true;
                        write_edit(&self.edits[i].1, Some(raw.get()), self.out)
                            .map_err(de::Error::custom)?;
                    }
                }
            }
            for (i, (name, edit)) in self.edits.iter().enumerate() {
                if done[i] {
                    continue;
                }
                if !first {
                    self.out.push(b',');
                }
                first = false;
                serde_json::to_writer(&mut *self.out, name).map_err(de::Error::custom)?;
                self.out.push(b':');
                write_edit(edit, None, self.out).map_err(de::Error::custom)?;
            }
            self.out.push(b'}');
            Ok(())
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    de::Deserializer::deserialize_map(&mut de, Members { edits, out })?;
    de.end()
}

fn write_edit(
    edit: &Edit<'_>,
    current: Option<&str>,
    out: &mut Vec<u8>,
) -> Result<(), serde_json::Error> {
    match edit {
        Edit::Set(json) => out.extend_from_slice(json.as_bytes()),
        Edit::Inside(edits) => match current.map(str::trim) {
            None | Some("null") => write_edited(b"{}", edits, out)?,
            Some(inner) => write_edited(inner.as_bytes(), edits, out)?,
        },
    }
    Ok(())
}

/// Deepest JSON nesting accepted: the limit of every full parse the gateway makes
/// (translation, caching, usage injection), applied to every request alike, so whether a
/// body is refused does not depend on the route it takes.
pub const MAX_NESTING: usize = 128;

/// Whether arrays and objects in `body` nest deeper than `limit` (strings skipped).
fn nesting_exceeds(body: &[u8], limit: usize) -> bool {
    shape(body).depth > limit
}

/// What a JSON text holds, counted outside strings in one pass without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Deepest nesting of arrays and objects.
    pub depth: usize,
    /// Values: each element and member value, and the outer one (an empty container
    /// over-counts by one, harmlessly).
    pub values: usize,
}

/// The [`Shape`] of `body`.
pub fn shape(body: &[u8]) -> Shape {
    let (mut depth, mut deepest, mut values) = (0usize, 0usize, 1usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in body {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
                values += 1;
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b',' => values += 1,
            _ => {}
        }
    }
    Shape {
        depth: deepest,
        values,
    }
}

/// A rough prompt-token estimate (about four bytes per token), used for mock usage and
/// for reserving tokens before the upstream reports the real count.
pub fn estimate_prompt_tokens(body: &[u8]) -> u64 {
    (body.len() as u64).div_ceil(4).max(1)
}

/// Tokens an image counts for in [`text_tokens_estimate`] (a large image at OpenAI's
/// and Anthropic's rates is 1,000 to 1,600).
pub const IMAGE_TOKENS: u64 = 1_600;

/// A closer prompt-token estimate than [`estimate_prompt_tokens`], for deciding whether a
/// request fits a model's context window: the text of every string in the body at about
/// four bytes per token, with inline images (`data:` URLs, base64 sources) counted as
/// [`IMAGE_TOKENS`] each rather than by their encoded size. `None` when the body is not
/// JSON.
pub fn text_tokens_estimate(body: &[u8]) -> Option<u64> {
    fn walk(v: &serde_json::Value, key: &str, total: &mut u64) {
        match v {
            serde_json::Value::String(s) => {
                let image = s.starts_with("data:")
                    || (key == "data" && s.len() > 256)
                    || (key == "image_url" && s.len() > 256);
                *total += if image {
                    IMAGE_TOKENS
                } else {
                    (s.len() as u64).div_ceil(4)
                };
            }
            serde_json::Value::Array(items) => {
                for item in items {
                    walk(item, key, total);
                }
            }
            serde_json::Value::Object(fields) => {
                for (k, item) in fields {
                    walk(item, k, total);
                }
            }
            _ => {}
        }
    }
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let mut total = 0;
    walk(&value, "", &mut total);
    Some(total.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_estimate_counts_text_and_images_apart() {
        let image = format!("data:image/png;base64,{}", "A".repeat(400_000));
        let body = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "x".repeat(4_000)},
            {"type": "image_url", "image_url": {"url": image}},
        ]}]})
        .to_string();
        let estimate = text_tokens_estimate(body.as_bytes()).unwrap();
        assert!(
            (1_000 + IMAGE_TOKENS..1_000 + IMAGE_TOKENS + 20).contains(&estimate),
            "{estimate}"
        );
        assert!(
            estimate_prompt_tokens(body.as_bytes()) > 100_000,
            "the byte estimate is far above"
        );
        assert_eq!(text_tokens_estimate(b"not json"), None);
    }

    #[test]
    fn head_parsing_reads_model_stream_and_usage_flags_only() {
        let head = parse_head(br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true},"max_completion_tokens":9}"#).unwrap();
        assert_eq!(head.model, "m");
        assert!(head.stream && head.include_usage());
        assert_eq!(head.max_tokens, Some(9));
    }

    #[test]
    fn malformed_bodies_give_actionable_400s() {
        for (body, needle) in [
            (&b""[..], "empty"),
            (b"{not json", "not valid JSON"),
            (br#"{"messages":[]}"#, "must provide a model"),
            (br#"{"model":42}"#, "Invalid request"),
            (br#"["m", true]"#, "expected a JSON object"),
            (
                br#"{"model":"m","stream":true,"stream_options":[]}"#,
                "expected a JSON object",
            ),
            (b"{\"model\":\"m\",\"x\":\"\xff\"}", "not valid UTF-8"),
            (
                format!(
                    r#"{{"model":"m","x":{}{}}}"#,
                    "[".repeat(200),
                    "]".repeat(200)
                )
                .as_bytes(),
                "deeper than 128",
            ),
        ] {
            let err = parse_head(body).unwrap_err();
            assert_eq!(err.status(), 400);
            assert!(err.to_string().contains(needle), "{err}");
        }
    }
}

#[cfg(test)]
mod edits {
    use super::*;

    fn edited(body: &str, edits: &[(&str, Edit<'_>)]) -> serde_json::Value {
        serde_json::from_slice(&edit_members(body.as_bytes(), edits).unwrap()).unwrap()
    }

    #[test]
    fn members_are_replaced_added_and_merged_without_touching_the_rest() {
        let body =
            r#"{"model":"a","messages":[{"role":"user","content":"h\u00e9"}],"stream":true}"#;
        let out = edit_members(
            body.as_bytes(),
            &[
                ("model", Edit::Set(r#""b""#)),
                (
                    "stream_options",
                    Edit::Inside(vec![("include_usage", Edit::Set("true"))]),
                ),
            ],
        )
        .unwrap();
        // Untouched members keep their exact bytes (escapes included).
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"model":"b","messages":[{"role":"user","content":"h\u00e9"}],"stream":true,"stream_options":{"include_usage":true}}"#
        );
        let merged = edited(
            r#"{"model":"a","stream_options":{"include_usage":false,"x":1}}"#,
            &[(
                "stream_options",
                Edit::Inside(vec![("include_usage", Edit::Set("true"))]),
            )],
        );
        assert_eq!(
            merged["stream_options"],
            serde_json::json!({"include_usage": true, "x": 1})
        );
        let from_null = edited(
            r#"{"model":"a","stream_options":null}"#,
            &[(
                "stream_options",
                Edit::Inside(vec![("include_usage", Edit::Set("true"))]),
            )],
        );
        assert_eq!(
            from_null["stream_options"],
            serde_json::json!({"include_usage": true})
        );
        // A key spelled with escapes is the same key.
        let escaped = edited(r#"{"mod\u0065l":"a"}"#, &[("model", Edit::Set(r#""b""#))]);
        assert_eq!(escaped, serde_json::json!({"model": "b"}));
    }

    #[test]
    fn what_is_not_an_object_is_refused() {
        for body in ["[1]", "{\"a\":1", "{} x", "{\"stream_options\":[]}"] {
            let edits = [(
                "stream_options",
                Edit::Inside(vec![("include_usage", Edit::Set("true"))]),
            )];
            assert!(edit_members(body.as_bytes(), &edits).is_err(), "{body}");
        }
    }
}

#[cfg(test)]
mod nesting {
    use super::*;

    #[test]
    fn nesting_is_counted_outside_strings_only() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(!nesting_exceeds(deep(128).as_bytes(), 128));
        assert!(nesting_exceeds(deep(129).as_bytes(), 128));
        // Brackets inside strings, escaped quotes included, do not count.
        let text = format!(r#"{{"a":"{}\"{}"}}"#, "[".repeat(500), "{".repeat(500));
        assert!(!nesting_exceeds(text.as_bytes(), 128));
    }
}
