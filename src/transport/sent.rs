//! An exchange whose response header has arrived: the connection, the header, and the
//! body bytes already read (to classify an error) that are relayed first.

use super::h1::{Conn, Head};
use bytes::Bytes;
use std::time::Duration;

/// A response header received from the target; the body is still unread.
pub struct Sent {
    pub conn: Conn,
    pub head: Head,
    /// The connection pool's key for the target.
    pub pool_key: u64,
    /// Body chunks already read (an error body read to classify it), relayed first.
    pub prefix: Vec<Bytes>,
    /// The whole response body is in `prefix`.
    pub ended: bool,
}

impl Sent {
    pub fn status(&self) -> u16 {
        self.head.status.as_u16()
    }

    pub fn headers(&self) -> &http::HeaderMap {
        &self.head.headers
    }

    /// Reads up to `limit` bytes of the response body into `prefix`, so that `inspect` can
    /// classify an error. Stops early at the end of the body or on an error.
    pub async fn read_prefix(&mut self, limit: usize, idle: Duration) {
        let mut total = 0;
        while total < limit {
            match self.conn.read_body(idle).await {
                Ok(Some(chunk)) => {
                    total += chunk.len();
                    self.prefix.push(chunk);
                }
                // At the end, or on an error nothing more can be read: what was read is
                // what the client gets.
                Ok(None) | Err(_) => {
                    self.ended = true;
                    return;
                }
            }
        }
    }

    /// The prefix as one contiguous slice (copied only when it came in several chunks).
    pub fn prefix_bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        match self.prefix.as_slice() {
            [] => std::borrow::Cow::Borrowed(&[]),
            [one] => std::borrow::Cow::Borrowed(one),
            many => std::borrow::Cow::Owned(many.concat()),
        }
    }
}
