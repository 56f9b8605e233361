//! Server-Sent Events: incremental parsing of the streams the gateway must translate, and
//! writing events.

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
    /// Leading bytes of `buffer` known to start no separator: each byte is scanned once,
    /// however finely a long event is split.
    searched: usize,
}

/// Largest event accepted; a stream that never ends an event is cut off here.
pub const MAX_EVENT_BYTES: usize = 8 * 1024 * 1024;

impl Parser {
    /// Feeds a chunk and returns the events it completed. Errors when an event grows
    /// beyond [`MAX_EVENT_BYTES`].
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<Event>, &'static str> {
        self.buffer.extend_from_slice(chunk);
        let mut events = Vec::new();
        let mut start = 0;
        let mut from = self.searched;
        while let Some((at, sep)) = find_blank_line(&self.buffer[from..]) {
            let end = from + at;
            if let Some(event) = parse_event(&self.buffer[start..end]) {
                events.push(event);
            }
            start = end + sep;
            from = start;
        }
        // One move of the unfinished rest, however many events the chunk completed.
        self.buffer.drain(..start);
        // A separator may begin in the last three bytes and end in the next chunk.
        self.searched = self.buffer.len().saturating_sub(3);
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

/// Writes one event: its `event:` line when named, then its data.
pub fn write_event(out: &mut Vec<u8>, name: Option<&str>, data: &str) {
    if let Some(name) = name {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.push(b'\n');
    }
    push_data(out, data);
}

/// Writes one event's data: a `data:` line per line of it (an event's data may span
/// several), then the blank line that ends the event.
fn push_data(out: &mut Vec<u8>, data: &str) {
    for line in data.split('\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
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
    fn any_split_of_a_stream_yields_the_same_events() {
        let stream: &[u8] = b": hi\r\n\r\nevent: a\ndata: 1\n\ndata: x\r\ndata: y\r\n\r\n\
            data: {\"k\":\"v\"}\r\rdata: [DONE]\n\nid: 7\n\ndata:\n\n";
        let whole = Parser::default().feed(stream).unwrap();
        assert_eq!(whole.len(), 5, "{whole:?}");
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2000 {
            let mut p = Parser::default();
            let mut events = Vec::new();
            let mut rest = stream;
            while !rest.is_empty() {
                let n = rng.usize(1..=rest.len().min(6));
                events.extend(p.feed(&rest[..n]).unwrap());
                rest = &rest[n..];
            }
            assert_eq!(events, whole);
        }
    }

    #[test]
    fn a_long_event_in_small_chunks_is_scanned_once() {
        // 4 MiB in 64-byte chunks: rescanning the buffer on every chunk would take
        // 65,536 scans of up to 4 MiB each (minutes); scanning once takes milliseconds.
        let mut p = Parser::default();
        let mut event = b"data: ".to_vec();
        event.resize(4 << 20, b'x');
        for piece in event.chunks(64) {
            assert!(p.feed(piece).unwrap().is_empty());
        }
        let done = p.feed(b"\n\n").unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].data.len(), (4 << 20) - 6);
    }

    #[test]
    fn an_event_that_never_ends_is_refused_beyond_the_limit() {
        let mut p = Parser::default();
        let big = vec![b'x'; MAX_EVENT_BYTES + 1];
        assert!(p.feed(&big).is_err());
    }
}
