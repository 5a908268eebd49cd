//! A request body several readers can read: the try in flight, a retry
//! after it, a mirror beside it. The body streams (nothing waits for it to
//! end, so gRPC streams work), and its first `limit` bytes are recorded as
//! they pass; a reader that starts later replays them. Once more than
//! `limit` bytes have passed the body is no longer replayable: the reader at
//! the front goes on alone, retries stop, and a reader left behind fails
//! (a mirror, never the primary). Memory per request is bounded by `limit`.
//!
//! (linkerd2-proxy's ReplayBody is the model; this one also lets readers
//! run side by side, for mirrors.)
use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use super::BoxError;

type Source = Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send>>;

enum Recorded {
    Data(Bytes),
    Trailers(HeaderMap),
}

impl Recorded {
    fn frame(&self) -> Frame<Bytes> {
        match self {
            Recorded::Data(b) => Frame::data(b.clone()),
            Recorded::Trailers(t) => Frame::trailers(t.clone()),
        }
    }
}

struct Shared {
    source: Source,
    /// The first frames, while they fit in the limit.
    recorded: Vec<Recorded>,
    recorded_bytes: usize,
    limit: usize,
    /// A frame went by unrecorded: no new reader can start over.
    overflow: bool,
    /// Frames taken from the source so far.
    pulled: usize,
    ended: bool,
    error: Option<String>,
    /// Readers waiting for the next frame from the source.
    waiters: Vec<Waker>,
    hint: SizeHint,
    /// Bytes received from the downstream (counted once).
    received: Arc<AtomicU64>,
}

impl Shared {
    fn wake_all(&mut self) {
        for w in self.waiters.drain(..) {
            w.wake();
        }
    }
}

/// One reader of a shared request body.
pub struct Replay {
    shared: Arc<Mutex<Shared>>,
    /// Index of the next frame this reader returns.
    pos: usize,
}

impl Replay {
    /// Wraps the downstream body; `received` counts its bytes.
    pub fn new<B>(body: B, limit: usize, received: Arc<AtomicU64>) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        use http_body_util::BodyExt;
        let hint = body.size_hint();
        let ended = body.is_end_stream();
        let source: Source = Box::pin(body.map_err(Into::into));
        Replay {
            shared: Arc::new(Mutex::new(Shared {
                source,
                recorded: Vec::new(),
                recorded_bytes: 0,
                limit,
                overflow: false,
                pulled: 0,
                ended,
                error: None,
                waiters: Vec::new(),
                hint,
                received,
            })),
            pos: 0,
        }
    }

    /// Whether a new reader can read the whole body from its start.
    pub fn replayable(&self) -> bool {
        !self.lock().overflow
    }

    /// A new reader from the start (`None` once not replayable).
    pub fn reader(&self) -> Option<Replay> {
        self.replayable().then(|| Replay {
            shared: self.shared.clone(),
            pos: 0,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Body for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut s = this.shared.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = s.recorded.get(this.pos) {
            let f = r.frame();
            this.pos += 1;
            return Poll::Ready(Some(Ok(f)));
        }
        if this.pos < s.pulled {
            // Frames this reader missed were never recorded.
            return Poll::Ready(Some(Err("request body too large to replay".into())));
        }
        if let Some(e) = &s.error {
            return Poll::Ready(Some(Err(e.clone().into())));
        }
        if s.ended {
            return Poll::Ready(None);
        }
        match s.source.as_mut().poll_frame(cx) {
            Poll::Pending => {
                if !s.waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    s.waiters.push(cx.waker().clone());
                }
                Poll::Pending
            }
            Poll::Ready(None) => {
                s.ended = true;
                s.wake_all();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                s.error = Some(e.to_string());
                s.wake_all();
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(f))) => {
                let len = f.data_ref().map_or(0, |d| d.len());
                s.received.fetch_add(len as u64, Ordering::Relaxed);
                s.pulled += 1;
                this.pos += 1;
                if !s.overflow && s.recorded_bytes + len <= s.limit {
                    s.recorded_bytes += len;
                    let r = match (f.data_ref(), f.trailers_ref()) {
                        (Some(d), _) => Recorded::Data(d.clone()),
                        (None, Some(t)) => Recorded::Trailers(t.clone()),
                        (None, None) => Recorded::Data(Bytes::new()),
                    };
                    s.recorded.push(r);
                } else {
                    s.overflow = true;
                }
                if this.pos == s.pulled && s.source.is_end_stream() {
                    s.ended = true;
                }
                s.wake_all();
                Poll::Ready(Some(Ok(f)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = self.lock();
        s.ended && s.error.is_none() && self.pos >= s.pulled
    }

    fn size_hint(&self) -> SizeHint {
        self.lock().hint
    }
}

impl Drop for Replay {
    fn drop(&mut self) {
        // The source may hold this reader's waker: let another reader poll it.
        self.lock().wake_all();
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    fn body(chunks: &[&'static str]) -> impl Body<Data = Bytes, Error = BoxError> + Send + 'static {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        StreamBody::new(futures::stream::iter(frames))
    }

    async fn all(b: Replay) -> Result<String, BoxError> {
        let bytes = b.collect().await?.to_bytes();
        Ok(String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn a_small_body_replays_and_counts_once() {
        let n = Arc::new(AtomicU64::new(0));
        let first = Replay::new(body(&["ab", "cd"]), 10, n.clone());
        let second = first.reader().unwrap();
        assert_eq!(all(first).await.unwrap(), "abcd");
        assert!(second.replayable());
        assert_eq!(all(second).await.unwrap(), "abcd");
        assert_eq!(n.load(Ordering::Relaxed), 4);
    }

    #[tokio::test]
    async fn a_large_body_streams_but_does_not_replay() {
        let n = Arc::new(AtomicU64::new(0));
        let first = Replay::new(body(&["abc", "def", "ghi"]), 4, n);
        let behind = first.reader().unwrap();
        let check = first.reader().unwrap();
        assert_eq!(all(first).await.unwrap(), "abcdefghi");
        assert!(!check.replayable());
        assert!(all(behind).await.is_err());
    }

    #[tokio::test]
    async fn readers_side_by_side_both_get_everything() {
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, BoxError>>();
        let a = Replay::new(StreamBody::new(rx), 1024, Arc::default());
        let b = a.reader().unwrap();
        let ta = tokio::spawn(all(a));
        let tb = tokio::spawn(all(b));
        for c in ["x", "y", "z"] {
            tx.unbounded_send(Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
                .unwrap();
            tokio::task::yield_now().await;
        }
        drop(tx);
        assert_eq!(ta.await.unwrap().unwrap(), "xyz");
        assert_eq!(tb.await.unwrap().unwrap(), "xyz");
    }
}
