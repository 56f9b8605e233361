//! Incremental parsing of Server-Sent Events, for streams the gateway must translate.

/// One event: its `event:` name (if any) and its `data:` lines joined by newlines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The `event:` field.
    pub event: Option<String>,
    /// The `data:` field(s).
    pub data: String,
}

/// Buffers bytes until whole events (terminated by a blank line) are available.
#[derive(Debug, Default)]
pub struct Parser {
    buffer: Vec<u8>,
}

/// Largest event accepted; a stream that never ends an event is cut off here.
pub const MAX_EVENT_BYTES: usize = 8 * 1024 * 1024;

impl Parser {
    /// Feeds a chunk and returns the events it completed. Errors when an event grows
    /// beyond [`MAX_EVENT_BYTES`].
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<Event>, &'static str> {
        self.buffer.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some((end, sep)) = find_blank_line(&self.buffer) {
            let raw: Vec<u8> = self.buffer.drain(..end + sep).collect();
            if let Some(event) = parse_event(&raw[..end]) {
                events.push(event);
            }
        }
        if self.buffer.len() > MAX_EVENT_BYTES {
            return Err("an SSE event exceeded the size limit");
        }
        Ok(events)
    }
}

/// Position and length of the first blank-line separator (`\n\n`, `\r\n\r\n` or `\r\r`).
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' && buf[i + 1] == b'\n' {
            return Some((i, 2));
        }
        if buf[i] == b'\r'
            && buf[i + 1] == b'\n'
            && buf.get(i + 2) == Some(&b'\r')
            && buf.get(i + 3) == Some(&b'\n')
        {
            return Some((i, 4));
        }
        if buf[i] == b'\r' && buf[i + 1] == b'\r' {
            return Some((i, 2));
        }
        i += 1;
    }
    None
}

fn parse_event(raw: &[u8]) -> Option<Event> {
    let text = String::from_utf8_lossy(raw);
    let mut event = None;
    let mut data: Option<String> = None;
    for line in text.split(['\n', '\r']) {
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = line
            .split_once(':')
            .map_or((line, ""), |(f, v)| (f, v.strip_prefix(' ').unwrap_or(v)));
        match field {
            "event" => event = Some(value.to_owned()),
            "data" => match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_owned()),
            },
            _ => {}
        }
    }
    data.map(|data| Event { event, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks_are_reassembled() {
        let mut p = Parser::default();
        assert!(p.feed(b"event: message_start\nda").unwrap().is_empty());
        let events = p.feed(b"ta: {\"a\":1}\n\ndata: [DONE]\n\n").unwrap();
        assert_eq!(
            events,
            vec![
                Event {
                    event: Some("message_start".into()),
                    data: "{\"a\":1}".into()
                },
                Event {
                    event: None,
                    data: "[DONE]".into()
                },
            ]
        );
    }

    #[test]
    fn comments_crlf_and_multi_line_data_are_handled() {
        let mut p = Parser::default();
        let events = p
            .feed(b": keep-alive\r\n\r\ndata: a\r\ndata: b\r\n\r\n")
            .unwrap();
        assert_eq!(
            events,
            vec![Event {
                event: None,
                data: "a\nb".into()
            }]
        );
    }

    #[test]
    fn an_event_that_never_ends_is_refused_beyond_the_limit() {
        let mut p = Parser::default();
        let big = vec![b'x'; MAX_EVENT_BYTES + 1];
        assert!(p.feed(&big).is_err());
    }
}
