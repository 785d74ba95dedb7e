//! Server-sent events read as they arrive: bytes in, whole events out (the `event:` name
//! and the `data:` lines joined), however the stream was cut into reads. Memory is
//! bounded by the largest event.

use std::borrow::Cow;

/// One complete event, borrowed from the reader's buffer.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Event<'a> {
    /// The `event:` field, empty when the event has none (bytes: the translators read
    /// only the data, so no name is checked as UTF-8).
    pub name: Cow<'a, [u8]>,
    /// The `data:` lines, joined with `\n`: bytes, for a JSON reader to take as they are.
    pub data: Cow<'a, [u8]>,
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
    /// Adds `chunk` and calls `each` for every event it completes, in order. A read that
    /// holds whole events is parsed where it lies, without a copy.
    pub fn feed(&mut self, chunk: &[u8], mut each: impl FnMut(Event<'_>)) {
        if self.buf.is_empty() {
            let used = split(chunk, 0, &mut each);
            self.keep(&chunk[used..]);
            return;
        }
        self.buf.extend_from_slice(chunk);
        let from = self.searched.saturating_sub(3);
        let buf = std::mem::take(&mut self.buf);
        let used = split(&buf, from, &mut each);
        self.buf = buf;
        self.buf.drain(..used);
        // Nothing left holds an event end: search only what arrives next.
        self.searched = self.buf.len();
        self.bound();
    }

    fn keep(&mut self, rest: &[u8]) {
        self.buf.extend_from_slice(rest);
        self.searched = rest.len();
        self.bound();
    }

    fn bound(&mut self) {
        if self.buf.len() > MAX_EVENT {
            log::warn!("an SSE event grew past {MAX_EVENT} bytes without ending; dropped");
            self.buf.clear();
            self.searched = 0;
        }
    }

    /// The last event when the stream ended without its blank line.
    pub fn finish(&mut self, each: impl FnOnce(Event<'_>)) {
        let rest = std::mem::take(&mut self.buf);
        self.searched = 0;
        if let Some(e) = parse(&rest) {
            each(e);
        }
    }
}

/// Calls `each` for every whole event in `buf` (the first event end searched from
/// `from`); returns how many bytes they used.
fn split(buf: &[u8], from: usize, each: &mut impl FnMut(Event<'_>)) -> usize {
    let mut start = 0;
    let mut search = from;
    while let Some((end, gap)) = event_end(buf, search) {
        if let Some(e) = parse(&buf[start..end]) {
            each(e);
        }
        start = end + gap;
        search = start;
    }
    start
}

/// Where the first event at or after `from` ends, and the length of the blank line
/// after it (`\n\n` or `\n\r\n`).
fn event_end(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    for i in memchr::memchr_iter(b'\n', &buf[from..]).map(|i| i + from) {
        match buf.get(i + 1) {
            Some(b'\n') => return Some((i, 2)),
            Some(b'\r') if buf.get(i + 2) == Some(&b'\n') => return Some((i, 3)),
            _ => {}
        }
    }
    None
}

fn parse(raw: &[u8]) -> Option<Event<'_>> {
    let mut name: Option<&[u8]> = None;
    let mut data: Option<Cow<'_, [u8]>> = None;
    let mut rest = raw;
    while !rest.is_empty() {
        let (line, next) = match memchr::memchr(b'\n', rest) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        rest = next;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let (field, value) = match memchr::memchr(b':', line) {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &line[line.len()..]),
        };
        match field {
            b"event" => name = Some(value),
            b"data" => match &mut data {
                None => data = Some(Cow::Borrowed(value)),
                Some(d) => {
                    let d = d.to_mut();
                    d.push(b'\n');
                    d.extend_from_slice(value);
                }
            },
            _ => {}
        }
    }
    if data.is_none() && name.is_none_or(<[u8]>::is_empty) {
        return None;
    }
    Some(Event {
        name: Cow::Borrowed(name.unwrap_or_default()),
        data: data.unwrap_or_default(),
    })
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

    fn owned(e: Event<'_>) -> Event<'static> {
        Event {
            name: Cow::Owned(e.name.into_owned()),
            data: Cow::Owned(e.data.into_owned()),
        }
    }

    fn events(pieces: &[&[u8]]) -> Vec<Event<'static>> {
        let mut r = Reader::default();
        let mut out = Vec::new();
        for p in pieces {
            r.feed(p, |e| out.push(owned(e)));
        }
        r.finish(|e| out.push(owned(e)));
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
                    name: b"a".as_slice().into(),
                    data: b"{\"x\":1}".as_slice().into()
                },
                Event {
                    name: b"".as_slice().into(),
                    data: b"2".as_slice().into()
                },
                Event {
                    name: b"".as_slice().into(),
                    data: b"l1\nl2".as_slice().into()
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
                name: b"".as_slice().into(),
                data: b"[DONE]".as_slice().into()
            }]
        );
    }
}
