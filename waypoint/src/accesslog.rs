//! One JSON line per request (and per opaque TCP connection), Envoy's
//! field names where it has one. Lines go through a bounded queue to a
//! writer task, so a slow stdout never stalls the data path; lines that do
//! not fit are counted and dropped.
use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use serde::Serialize;
use tokio::sync::mpsc;

const QUEUE: usize = 4096;

/// One access-log line.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Entry {
    pub start_time: String,
    /// `http` or `grpc` or `tcp`.
    pub protocol: &'static str,
    pub method: String,
    pub path: String,
    pub authority: String,
    pub response_code: u16,
    pub grpc_status: String,
    pub response_flags: String,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration_ms: u64,
    pub upstream_host: String,
    pub destination_service: String,
    pub downstream_remote_address: String,
    pub source_principal: String,
    pub destination_principal: String,
    pub x_forwarded_for: String,
    pub user_agent: String,
    pub trace_id: String,
    pub connect_authority: String,
}

#[derive(Clone, Default)]
pub struct AccessLog {
    tx: Option<mpsc::Sender<String>>,
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    /// No access log.
    pub fn off() -> Self {
        Self::default()
    }

    /// Lines go to the returned receiver (the app writes them to stdout).
    pub fn channel() -> (Self, mpsc::Receiver<String>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            Self {
                tx: Some(tx),
                dropped: Arc::default(),
            },
            rx,
        )
    }

    /// Writes the lines of `rx` to stdout until every sender is gone.
    pub async fn write_stdout(mut rx: mpsc::Receiver<String>) {
        use tokio::io::AsyncWriteExt;
        let mut out = tokio::io::stdout();
        while let Some(mut line) = rx.recv().await {
            line.push('\n');
            if out.write_all(line.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    pub fn log(&self, e: &Entry) {
        let Some(tx) = &self.tx else { return };
        let line = serde_json::to_string(e).expect("serializable");
        if tx.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lines dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// RFC 3339 with milliseconds, UTC.
pub fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
