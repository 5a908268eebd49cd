//! Request framing rules (no request smuggling): a request with both
//! `Content-Length` and `Transfer-Encoding`, or with more than one
//! `Content-Length` (repeated, or a list), is rejected with 400 and the
//! connection closed.
//!
//! hyper's HTTP/1.1 parser accepts both cases silently (it drops the
//! Content-Length next to a Transfer-Encoding and folds equal duplicates),
//! so the request never shows them. [`Guard`] therefore reads the raw
//! HTTP/1.1 stream as it passes to hyper: it finds each request head,
//! judges it, and follows the message framing (Content-Length or chunked)
//! to the next head; the verdicts queue up in order and the request handler
//! takes one per request ([`Verdicts::next`]). After an upgrade request the
//! stream is no longer HTTP and the guard stops looking. h2 has no such
//! ambiguity in framing; its headers are checked with [`check_headers`].
use std::{
    collections::VecDeque,
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use http::HeaderMap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Per-request verdicts of one connection, in request order (`None`: fine).
#[derive(Clone, Default)]
pub struct Verdicts(Arc<Mutex<VecDeque<Option<String>>>>);

impl Verdicts {
    fn push(&self, v: Option<String>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push_back(v);
    }

    /// The verdict on the next request, if it was judged bad.
    pub fn next(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).pop_front().flatten()
    }

    /// Every verdict not taken yet, in order (for the fuzz target, which
    /// compares the guard's judgements across ways of splitting a stream).
    #[doc(hidden)]
    pub fn pending(&self) -> Vec<Option<String>> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// Framing checks on a parsed header map (h2, and a second line of defence).
pub fn check_headers(h: &HeaderMap) -> Option<String> {
    let cl = h.get_all(http::header::CONTENT_LENGTH).iter().count();
    if cl > 1 {
        return Some("more than one Content-Length".into());
    }
    if cl == 1 && h.contains_key(http::header::TRANSFER_ENCODING) {
        return Some("both Content-Length and Transfer-Encoding".into());
    }
    None
}

/// Where the guard is in the byte stream.
#[derive(Debug)]
enum State {
    /// Collecting a request head (up to the empty line).
    Head(Vec<u8>),
    /// Skipping this many body bytes.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize(Vec<u8>),
    /// Skipping chunk data, then its CRLF.
    ChunkData(u64),
    /// Reading trailer lines until the empty one.
    Trailers(Vec<u8>),
    /// Not HTTP/1.1 framing any more (upgrade) or given up: pass through.
    Off,
}

/// Judges request heads as the bytes pass (see the module docs).
pub struct Guard<IO> {
    inner: IO,
    state: State,
    verdicts: Verdicts,
    max_head: usize,
}

impl<IO> Guard<IO> {
    pub fn new(inner: IO, verdicts: Verdicts, max_head: usize) -> Self {
        Self {
            inner,
            state: State::Head(Vec::new()),
            verdicts,
            max_head,
        }
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            data = match &mut self.state {
                State::Off => return,
                State::Head(buf) if buf.is_empty() && matches!(data[0], b'\r' | b'\n') => {
                    // Empty lines before a request line are skipped (RFC
                    // 9112 2.2, as hyper does), byte by byte: however the
                    // client splits them, the head after them is judged.
                    &data[1..]
                }
                State::Head(buf) => {
                    let Some(end) = line_end_of_head(buf, data) else {
                        buf.extend_from_slice(data);
                        if buf.len() > self.max_head {
                            // hyper rejects it (431); nothing to follow.
                            self.state = State::Off;
                        }
                        return;
                    };
                    buf.extend_from_slice(&data[..end]);
                    let head = std::mem::take(buf);
                    let rest = &data[end..];
                    self.judge(&head);
                    rest
                }
                State::Body(n) => {
                    let take = (*n).min(data.len() as u64) as usize;
                    *n -= take as u64;
                    if *n == 0 {
                        self.state = State::Head(Vec::new());
                    }
                    &data[take..]
                }
                State::ChunkSize(line) => match take_line(line, data) {
                    None => return,
                    Some(rest) => {
                        let size = chunk_size(line);
                        self.state = match size {
                            None => State::Off,
                            Some(0) => State::Trailers(Vec::new()),
                            Some(n) => State::ChunkData(n + 2),
                        };
                        rest
                    }
                },
                State::ChunkData(n) => {
                    let take = (*n).min(data.len() as u64) as usize;
                    *n -= take as u64;
                    if *n == 0 {
                        self.state = State::ChunkSize(Vec::new());
                    }
                    &data[take..]
                }
                State::Trailers(line) => match take_line(line, data) {
                    None => return,
                    Some(rest) => {
                        self.state = if line.as_slice() == b"\r\n" || line.as_slice() == b"\n" {
                            State::Head(Vec::new())
                        } else {
                            State::Trailers(Vec::new())
                        };
                        rest
                    }
                },
            };
        }
    }

    /// Judges one head and sets up the framing of its body.
    fn judge(&mut self, head: &[u8]) {
        let text = String::from_utf8_lossy(head);
        let mut lines = text.split('\n').map(|l| l.trim_end_matches('\r'));
        let first = lines.next().unwrap_or("");
        if first.is_empty() {
            // Empty lines between requests are ignored (RFC 9112 2.2).
            self.state = State::Head(Vec::new());
            return;
        }
        let (mut cls, mut te, mut upgrade) = (Vec::new(), Vec::new(), false);
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => cls.extend(value.split(',').map(|v| v.trim().to_string())),
                "transfer-encoding" => te.push(value.to_ascii_lowercase()),
                "upgrade" => upgrade = true,
                _ => {}
            }
        }
        let verdict = if cls.len() > 1 {
            Some(format!("more than one Content-Length ({})", cls.join(", ")))
        } else if !cls.is_empty() && !te.is_empty() {
            Some("both Content-Length and Transfer-Encoding".into())
        } else {
            None
        };
        self.state = if verdict.is_some() || upgrade || first.starts_with("CONNECT ") {
            // The connection ends after a rejected request; after an
            // upgrade the bytes are no longer HTTP/1.1.
            State::Off
        } else if te
            .last()
            .is_some_and(|t| t.rsplit(',').next().unwrap_or("").trim() == "chunked")
        {
            State::ChunkSize(Vec::new())
        } else if !te.is_empty() {
            // hyper rejects it; nothing to follow.
            State::Off
        } else {
            match cls.first().map(|v| v.parse::<u64>()) {
                None => State::Head(Vec::new()),
                Some(Ok(0)) => State::Head(Vec::new()),
                Some(Ok(n)) => State::Body(n),
                Some(Err(_)) => State::Off,
            }
        };
        self.verdicts.push(verdict);
    }
}

/// Where the head ends in `data` (just past the empty line), given what
/// `buf` already holds.
fn line_end_of_head(buf: &[u8], data: &[u8]) -> Option<usize> {
    // Look at the tail of buf joined with data for "\r\n\r\n" or "\n\n".
    let tail_len = buf.len().min(3);
    let mut joined = buf[buf.len() - tail_len..].to_vec();
    joined.extend_from_slice(data);
    let find = |pat: &[u8]| joined.windows(pat.len()).position(|w| w == pat).map(|p| p + pat.len());
    let end = [find(b"\r\n\r\n"), find(b"\n\n")].into_iter().flatten().min()?;
    Some(end - tail_len)
}

/// Appends `data` to `line` up to and including '\n'; the rest, if the line
/// is complete. Lines are bounded (a chunk-size line is short).
fn take_line<'a>(line: &mut Vec<u8>, data: &'a [u8]) -> Option<&'a [u8]> {
    match data.iter().position(|b| *b == b'\n') {
        Some(i) => {
            line.extend_from_slice(&data[..=i]);
            Some(&data[i + 1..])
        }
        None => {
            line.extend_from_slice(data);
            if line.len() > 4096 {
                line.clear();
            }
            None
        }
    }
}

fn chunk_size(line: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(line).ok()?;
    let hex = s.trim().split(';').next()?.trim();
    u64::from_str_radix(hex, 16).ok()
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guard<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let new = buf.filled()[before..].to_vec();
            self.feed(&new);
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guard<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(stream: &[u8], split: usize) -> Vec<Option<String>> {
        let v = Verdicts::default();
        let mut g = Guard::new(tokio::io::empty(), v.clone(), 1 << 16);
        for piece in stream.chunks(split) {
            g.feed(piece);
        }
        let out = v.0.lock().unwrap().iter().cloned().collect();
        out
    }

    #[test]
    fn follows_framing_across_requests_and_judges_each_head() {
        let stream = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nGET /\r\n0\r\nX-T: 1\r\n\r\n\
GET /c HTTP/1.1\r\nHost: x\r\n\r\n\
GET /d HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx";
        for split in [1, 3, 7, 1000] {
            let v = verdicts(stream, split);
            assert_eq!(v.len(), 4, "split {split}: {v:?}");
            assert!(v[..3].iter().all(Option::is_none), "split {split}: {v:?}");
            assert!(v[3].as_deref().unwrap().contains("more than one Content-Length"));
        }
    }

    /// Found by the `waypoint_http` fuzz target: a CRLF before the
    /// request line, split from it ("\r" | "\n..."), made the guard take
    /// the whole head for an empty line and judge nothing, so CL.TE passed.
    #[test]
    fn empty_lines_before_a_head_are_skipped_however_split() {
        let stream = b"\r\nPOST / HTTP/1.1\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG";
        for split in [1, 2, 3, 1000] {
            let v = verdicts(stream, split);
            assert_eq!(v.len(), 1, "split {split}: {v:?}");
            assert!(
                v[0].as_deref().is_some_and(|r| r.contains("both")),
                "split {split}: {v:?}"
            );
        }
        assert_eq!(verdicts(b"\r\n\xff\n\n", 1), verdicts(b"\r\n\xff\n\n", 5));
    }

    #[test]
    fn content_length_with_transfer_encoding_and_lists_are_bad() {
        let v = verdicts(
            b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
            5,
        );
        assert!(v[0].as_deref().unwrap().contains("both"));
        let v = verdicts(b"POST / HTTP/1.1\r\ncontent-length: 4, 4\r\n\r\nabcd", 100);
        assert!(v[0].is_some());
    }
}
