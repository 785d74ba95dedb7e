//! A forward reader over JSON for the few members a caller wants from a large document:
//! it reads those and steps over every other value without decoding it.

use std::borrow::Cow;

/// A forward reader over one JSON document: it reads the members it is asked for and
/// steps over every other value (strings found with `memchr`, nothing decoded). It
/// checks the structure it walks, not every scalar's syntax.
pub struct Walk<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Walk<'a> {
    pub fn new(s: &'a [u8]) -> Walk<'a> {
        Walk { s, i: 0 }
    }

    /// The next byte that is not whitespace, which becomes the current one.
    fn peek(&mut self) -> Option<u8> {
        while let Some(&b) = self.s.get(self.i) {
            if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
                return Some(b);
            }
            self.i += 1;
        }
        None
    }

    fn eat(&mut self, b: u8) -> Option<()> {
        (self.peek()? == b).then(|| self.i += 1)
    }

    /// Only whitespace is left.
    pub fn end(&mut self) -> Option<()> {
        self.peek().is_none().then_some(())
    }

    /// Steps over `null` if it is next.
    pub fn null(&mut self) -> bool {
        let at_null = self.peek() == Some(b'n') && self.s[self.i..].starts_with(b"null");
        if at_null {
            self.i += 4;
        }
        at_null
    }

    /// A string's bytes between its quotes, escapes as written.
    fn raw_string(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let start = self.i;
        loop {
            let at = self.i + memchr::memchr2(b'"', b'\\', self.s.get(self.i..)?)?;
            if self.s[at] == b'"' {
                self.i = at + 1;
                return Some(&self.s[start..at]);
            }
            self.i = at + 2;
        }
    }

    /// A string value, borrowed unless it holds an escape; `Some(None)` for a value of
    /// another type, stepped over.
    pub fn text(&mut self) -> Option<Option<Cow<'a, str>>> {
        if self.peek()? != b'"' {
            self.skip()?;
            return Some(None);
        }
        let start = self.i;
        let raw = self.raw_string()?;
        if !raw.contains(&b'\\') {
            return std::str::from_utf8(raw)
                .ok()
                .map(|s| Some(Cow::Borrowed(s)));
        }
        let quoted = &self.s[start..self.i];
        serde_json::from_slice::<String>(quoted)
            .ok()
            .map(|s| Some(Cow::Owned(s)))
    }

    /// Steps over one value of any type.
    pub fn skip(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.raw_string().map(drop),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match *self.s.get(self.i)? {
                        b'"' => {
                            self.raw_string()?;
                        }
                        b'{' | b'[' => {
                            depth += 1;
                            self.i += 1;
                        }
                        b'}' | b']' => {
                            depth -= 1;
                            self.i += 1;
                            if depth == 0 {
                                return Some(());
                            }
                        }
                        _ => self.i += 1,
                    }
                }
            }
            _ => {
                let rest = &self.s[self.i..];
                let len = rest
                    .iter()
                    .position(|b| b",}] \t\n\r".contains(b))
                    .unwrap_or(rest.len());
                (len > 0).then(|| self.i += len)
            }
        }
    }

    /// An object, each member's value read or stepped over by `member`, given its name.
    pub fn object(
        &mut self,
        mut member: impl FnMut(&mut Self, &'a [u8]) -> Option<()>,
    ) -> Option<()> {
        self.eat(b'{')?;
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(());
        }
        loop {
            let key = self.raw_string()?;
            self.eat(b':')?;
            member(self, key)?;
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// An array, each item read by `item`.
    pub fn array(&mut self, mut item: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.eat(b'[')?;
        if self.peek()? == b']' {
            self.i += 1;
            return Some(());
        }
        loop {
            item(self)?;
            match self.peek()? {
                b',' => self.i += 1,
                b']' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }
}
