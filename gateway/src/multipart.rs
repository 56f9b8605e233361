//! Multipart uploads (`/v1/audio/transcriptions`): the form read whole, within limits,
//! by `multer` (axum's own parser), and written out again for each upstream call.
//!
//! The upstream never receives the client's bytes: it receives the form as the gateway
//! read it, re-encoded with a fresh boundary. A body two parsers would read differently
//! (two `model` parts, a part hidden behind a malformed header, a boundary inside a
//! quoted name) therefore cannot route or authorise one model and have another one
//! served.

use bytes::{BufMut, Bytes, BytesMut};
use http::HeaderValue;

use crate::{error::ApiError, request::RequestHead};

/// Most parts a form may have (OpenAI's transcription form has about a dozen fields).
const MAX_PARTS: usize = 64;

/// Largest text field (a `prompt`, a `language`…), in bytes.
const MAX_TEXT: usize = 64 * 1024;

/// One part of a form.
#[derive(Debug, Clone)]
struct Part {
    name: String,
    file_name: Option<String>,
    content_type: Option<String>,
    data: Bytes,
}

/// A multipart form, as read.
#[derive(Debug, Clone)]
pub struct Form {
    parts: Vec<Part>,
}

fn invalid(message: impl Into<String>, param: Option<&'static str>) -> ApiError {
    ApiError::bad_request(message, param)
}

impl Form {
    /// Reads `body`, sent with `content_type`, as a form with one `file` part (the only
    /// part with a filename) and one `model`. Refused with a 400 that says why: another
    /// content type, a malformed body, more than [`MAX_PARTS`] parts, an unnamed part, a
    /// field name other than letters, digits and `_ - . [ ]`, a field given twice (but
    /// `name[]` arrays), a text field sent as a file or the file as text, a text field
    /// over [`MAX_TEXT`] bytes or not UTF-8, no file or no model.
    pub async fn parse(body: Bytes, content_type: Option<&str>) -> Result<Self, ApiError> {
        let content_type = content_type.unwrap_or_default();
        if !content_type
            .trim_start()
            .to_ascii_lowercase()
            .starts_with("multipart/form-data")
        {
            return Err(invalid(
                "This endpoint takes a multipart/form-data upload (Content-Type: multipart/form-data; boundary=…) with a `file` and a `model`.",
                None,
            ));
        }
        let boundary = multer::parse_boundary(content_type)
            .map_err(|_| invalid("The Content-Type names no usable multipart boundary.", None))?;
        let size = body.len() as u64;
        let source = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) });
        let constraints = multer::Constraints::new()
            .size_limit(multer::SizeLimit::new().whole_stream(size).per_field(size));
        let mut multipart = multer::Multipart::with_constraints(source, boundary, constraints);
        let mut parts: Vec<Part> = Vec::new();
        loop {
            let field = multipart
                .next_field()
                .await
                .map_err(|e| invalid(format!("The multipart body could not be read: {e}"), None))?;
            let Some(field) = field else { break };
            if parts.len() == MAX_PARTS {
                return Err(invalid(
                    format!("The form has more than {MAX_PARTS} parts."),
                    None,
                ));
            }
            let Some(name) = field.name().map(str::to_owned) else {
                return Err(invalid("A part of the form has no name.", None));
            };
            if name.is_empty()
                || name.len() > 64
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.[]".contains(&b))
            {
                let shown: String = name.chars().take(64).collect();
                return Err(invalid(
                    format!(
                        "The form field name `{}` is not one this API uses.",
                        shown.escape_debug()
                    ),
                    None,
                ));
            }
            if !name.ends_with("[]") && parts.iter().any(|p| p.name == name) {
                return Err(invalid(
                    format!("The form field `{name}` is given more than once."),
                    None,
                ));
            }
            let file_name = field.file_name().map(str::to_owned);
            // A text field sent as a file would pass unread by the request guardrails.
            if file_name.is_some() != (name == "file") {
                return Err(invalid(
                    format!(
                        "Only the `file` part of this form is a file (with a filename), and it is one: `{name}` is not sent that way."
                    ),
                    None,
                ));
            }
            let content_type = field.content_type().map(ToString::to_string);
            let data = field
                .bytes()
                .await
                .map_err(|e| invalid(format!("The multipart body could not be read: {e}"), None))?;
            if file_name.is_none() {
                if data.len() > MAX_TEXT {
                    return Err(invalid(
                        format!("The form field `{name}` is longer than {MAX_TEXT} bytes."),
                        None,
                    ));
                }
                if std::str::from_utf8(&data).is_err() {
                    return Err(invalid(
                        format!("The form field `{name}` is not UTF-8 text."),
                        None,
                    ));
                }
            }
            parts.push(Part {
                name,
                file_name,
                content_type,
                data,
            });
        }
        let form = Self { parts };
        if !form.parts.iter().any(|p| p.name == "file") {
            return Err(invalid("You must provide a file.", Some("file")));
        }
        if form.text("model").is_none_or(str::is_empty) {
            return Err(invalid(
                "You must provide a model parameter.",
                Some("model"),
            ));
        }
        Ok(form)
    }

    /// The text of field `name`, when the form has it as text.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.parts
            .iter()
            .find(|p| p.name == name && p.file_name.is_none())
            .and_then(|p| std::str::from_utf8(&p.data).ok())
    }

    /// Replaces the text of field `name`, which the form has.
    pub fn set_text(&mut self, name: &str, text: String) {
        if let Some(p) = self.parts.iter_mut().find(|p| p.name == name) {
            p.data = Bytes::from(text);
        }
    }

    /// What the gateway needs of the request: the model, and whether it streams.
    pub fn head(&self) -> RequestHead {
        RequestHead {
            model: self.text("model").unwrap_or_default().to_owned(),
            stream: self
                .text("stream")
                .is_some_and(|s| s.trim().eq_ignore_ascii_case("true")),
            stream_options: None,
            max_tokens: None,
            previous_response_id: None,
        }
    }

    /// The bytes the form holds (what it costs in memory once more when encoded).
    pub fn len(&self) -> usize {
        self.parts.iter().map(|p| p.data.len() + 256).sum()
    }

    /// Whether the form has no parts (never true of a parsed form).
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// The form for an upstream, with `model` set to `upstream_model`: the body and its
    /// Content-Type.
    pub fn encode(&self, upstream_model: &str) -> (Bytes, HeaderValue) {
        let boundary = self.boundary();
        let mut out = BytesMut::with_capacity(self.len() + 64);
        for part in &self.parts {
            out.put_slice(b"--");
            out.put_slice(boundary.as_bytes());
            out.put_slice(b"\r\nContent-Disposition: form-data; name=\"");
            out.put_slice(part.name.as_bytes());
            out.put_slice(b"\"");
            if let Some(file_name) = &part.file_name {
                out.put_slice(b"; filename=\"");
                out.put_slice(quoted(file_name).as_bytes());
                out.put_slice(b"\"");
            }
            out.put_slice(b"\r\n");
            if let Some(content_type) = &part.content_type {
                out.put_slice(b"Content-Type: ");
                out.put_slice(content_type.as_bytes());
                out.put_slice(b"\r\n");
            }
            out.put_slice(b"\r\n");
            if part.name == "model" && part.file_name.is_none() {
                out.put_slice(upstream_model.as_bytes());
            } else {
                out.put_slice(&part.data);
            }
            out.put_slice(b"\r\n");
        }
        out.put_slice(b"--");
        out.put_slice(boundary.as_bytes());
        out.put_slice(b"--\r\n");
        let content_type =
            HeaderValue::try_from(format!("multipart/form-data; boundary={boundary}"))
                .expect("the boundary is alphanumeric");
        (out.freeze(), content_type)
    }

    /// A boundary that occurs in no part.
    fn boundary(&self) -> String {
        loop {
            let boundary = format!(
                "tollgate-{:016x}{:016x}",
                fastrand::u64(..),
                fastrand::u64(..)
            );
            let finder = memchr::memmem::Finder::new(boundary.as_bytes());
            if self.parts.iter().all(|p| finder.find(&p.data).is_none()) {
                return boundary;
            }
        }
    }
}

/// A file name as a quoted-string of a Content-Disposition header: the quote and line
/// breaks percent-encoded as browsers do (HTML's multipart/form-data encoding), so a name
/// cannot end the header or add one.
fn quoted(name: &str) -> String {
    name.replace('"', "%22")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

#[cfg(test)]
mod tests {
    use super::*;

    const CT: &str = "multipart/form-data; boundary=XyZ";

    fn body(parts: &[(&str, Option<&str>, &[u8])]) -> Bytes {
        let mut out = Vec::new();
        for (name, file, data) in parts {
            out.extend_from_slice(b"--XyZ\r\nContent-Disposition: form-data; name=\"");
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\"");
            if let Some(f) = file {
                out.extend_from_slice(
                    format!("; filename=\"{f}\"\r\nContent-Type: audio/wav").as_bytes(),
                );
            }
            out.extend_from_slice(b"\r\n\r\n");
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"--XyZ--\r\n");
        Bytes::from(out)
    }

    async fn parse(parts: &[(&str, Option<&str>, &[u8])]) -> Result<Form, String> {
        Form::parse(body(parts), Some(CT))
            .await
            .map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn a_form_is_read_and_written_again_with_the_upstream_model() {
        let form = parse(&[
            ("file", Some("a.wav"), b"RIFF\0\0binary\r\n--Xy-"),
            ("model", None, b"whisper-1"),
            ("stream", None, b"true"),
            ("timestamp_granularities[]", None, b"word"),
            ("timestamp_granularities[]", None, b"segment"),
        ])
        .await
        .unwrap();
        let head = form.head();
        assert_eq!(head.model, "whisper-1");
        assert!(head.stream);
        let (bytes, content_type) = form.encode("whisper-large-v3");
        let again = Form::parse(bytes, content_type.to_str().ok())
            .await
            .unwrap();
        assert_eq!(again.text("model"), Some("whisper-large-v3"));
        assert_eq!(again.parts.len(), 5);
        assert_eq!(&again.parts[0].data[..], b"RIFF\0\0binary\r\n--Xy-");
        assert_eq!(again.parts[0].file_name.as_deref(), Some("a.wav"));
        assert_eq!(again.parts[0].content_type.as_deref(), Some("audio/wav"));
    }

    #[tokio::test]
    async fn forms_two_parsers_could_read_differently_are_refused() {
        // Two models: the gateway would authorise one and the upstream serve the other.
        let twice = parse(&[
            ("file", Some("a.wav"), b"x"),
            ("model", None, b"cheap"),
            ("model", None, b"expensive"),
        ])
        .await
        .unwrap_err();
        assert!(twice.contains("more than once"), "{twice}");
        for (parts, says) in [
            (&[("model", None, &b"m"[..])][..], "file"),
            (&[("file", Some("a.wav"), &b"x"[..])][..], "model"),
            (
                &[("file", Some("a"), &b"x"[..]), ("model", None, &b""[..])][..],
                "model",
            ),
            (
                &[
                    ("file", Some("a"), &b"x"[..]),
                    ("model", None, &b"m"[..]),
                    ("bad name", None, &b"1"[..]),
                ][..],
                "not one this API uses",
            ),
            (
                &[
                    ("file", Some("a"), &b"x"[..]),
                    ("model", None, &b"\xff\xfe"[..]),
                ][..],
                "UTF-8",
            ),
        ] {
            let e = parse(parts).await.unwrap_err();
            assert!(e.contains(says), "{e}");
        }
        let many: Vec<(String, Option<&str>, &[u8])> = (0..=MAX_PARTS)
            .map(|i| (format!("f{i}"), None, &b"1"[..]))
            .collect();
        let many: Vec<(&str, Option<&str>, &[u8])> =
            many.iter().map(|(n, f, d)| (n.as_str(), *f, *d)).collect();
        assert!(
            parse(&many)
                .await
                .unwrap_err()
                .contains("more than 64 parts")
        );
        let long = vec![b'a'; MAX_TEXT + 1];
        assert!(
            parse(&[
                ("file", Some("a"), b"x"),
                ("model", None, b"m"),
                ("prompt", None, &long)
            ])
            .await
            .unwrap_err()
            .contains("longer than")
        );
    }

    #[tokio::test]
    async fn what_is_not_a_form_is_refused_with_a_reason() {
        let good = body(&[("file", Some("a"), b"x"), ("model", None, b"m")]);
        for (content_type, says) in [
            (None, "multipart/form-data"),
            (Some("application/json"), "multipart/form-data"),
            (Some("multipart/form-data"), "boundary"),
        ] {
            let e = Form::parse(good.clone(), content_type)
                .await
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{content_type:?}: {e}");
        }
        // Cut short, or another boundary than the one declared.
        let cut = good.slice(..good.len() - 12);
        assert!(Form::parse(cut, Some(CT)).await.is_err());
        assert!(
            Form::parse(good, Some("multipart/form-data; boundary=Other"))
                .await
                .is_err()
        );
    }

    #[test]
    fn a_file_name_cannot_end_its_header() {
        let form = Form {
            parts: vec![Part {
                name: "file".into(),
                file_name: Some(
                    "a.wav\"\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nevil".into(),
                ),
                content_type: None,
                data: Bytes::from_static(b"x"),
            }],
        };
        let (bytes, _) = form.encode("m");
        let text = String::from_utf8_lossy(&bytes);
        assert_eq!(text.matches("\r\nContent-Disposition").count(), 1, "{text}");
        assert!(text.contains("filename=\"a.wav%22%0D%0AContent-Disposition"));
    }
}
