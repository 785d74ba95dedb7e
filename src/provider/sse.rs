//! Server-sent events read as they arrive: bytes in, whole events out (the `event:` name
//! and the `data:` lines joined), however the stream was cut into reads. Memory is
//! bounded by the largest event.

/// One complete event.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// The `event:` field, empty when the event has none.
    pub name: String,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
}

/// Splits a byte stream into events.
#[derive(Default)]
pub struct Reader {
    buf: Vec<u8>,
    /// How much of `buf` was already searched for an event end.
    searched: usize,
}

/// The largest event held while waiting for its end; past it the event is dropped.
pub const MAX_EVENT: usize = 4 << 20;

impl Reader {
    /// Adds `chunk` and calls `each` for every event it completes, in order.
    pub fn feed(&mut self, chunk: &[u8], mut each: impl FnMut(Event)) {
        self.buf.extend_from_slice(chunk);
        let mut start = 0;
        loop {
            let from = (start + self.searched).saturating_sub(3).max(start);
            let Some((end, gap)) = event_end(&self.buf[from..]) else {
                self.searched = self.buf.len() - start;
                break;
            };
            let event_end = from + end;
            if let Some(e) = parse(&self.buf[start..event_end]) {
                each(e);
            }
            start = event_end + gap;
            self.searched = 0;
        }
        self.buf.drain(..start);
        if self.buf.len() > MAX_EVENT {
            log::warn!("an SSE event grew past {MAX_EVENT} bytes without ending; dropped");
            self.buf.clear();
            self.searched = 0;
        }
    }

    /// The last event when the stream ended without its blank line.
    pub fn finish(&mut self) -> Option<Event> {
        let rest = std::mem::take(&mut self.buf);
        parse(&rest)
    }
}

/// Where the first event of `buf` ends, and the length of the blank line after it.
fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' {
            if buf[i + 1] == b'\n' {
                return Some((i, 2));
            }
            if buf[i + 1] == b'\r' && buf.get(i + 2) == Some(&b'\n') {
                return Some((i, 3));
            }
        }
        i += 1;
    }
    None
}

fn parse(raw: &[u8]) -> Option<Event> {
    let text = String::from_utf8_lossy(raw);
    let mut event = Event::default();
    let mut any = false;
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => event.name = value.to_string(),
            "data" => {
                if any {
                    event.data.push('\n');
                }
                event.data.push_str(value);
                any = true;
            }
            _ => {}
        }
    }
    (any || !event.name.is_empty()).then_some(event)
}

/// Appends one event in wire form: `event: NAME` when named, then `data: DATA`.
pub fn write(out: &mut Vec<u8>, name: Option<&str>, data: &[u8]) {
    if let Some(name) = name {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(pieces: &[&[u8]]) -> Vec<Event> {
        let mut r = Reader::default();
        let mut out = Vec::new();
        for p in pieces {
            r.feed(p, |e| out.push(e));
        }
        out.extend(r.finish());
        out
    }

    #[test]
    fn events_are_whole_however_the_bytes_are_cut() {
        let wire =
            b"event: a\ndata: {\"x\":1}\n\n: comment\n\ndata: 2\r\n\r\ndata: l1\ndata: l2\n\n";
        let whole = events(&[wire]);
        assert_eq!(
            whole,
            vec![
                Event {
                    name: "a".into(),
                    data: "{\"x\":1}".into()
                },
                Event {
                    name: String::new(),
                    data: "2".into()
                },
                Event {
                    name: String::new(),
                    data: "l1\nl2".into()
                },
            ]
        );
        for cut in 0..wire.len() {
            assert_eq!(events(&[&wire[..cut], &wire[cut..]]), whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(events(&bytes), whole);
    }

    #[test]
    fn an_unterminated_last_event_is_returned_by_finish() {
        assert_eq!(
            events(&[b"data: [DONE]"]),
            vec![Event {
                name: String::new(),
                data: "[DONE]".into()
            }]
        );
    }
}
