//! An optional per-change delivery trace, for `omni bench --service`: one
//! line when the shared consumer receives a live change and one when its
//! watcher hands it to gRPC, each with the wall-clock time. The bench joins
//! them with its own reference consumer's receipts and its watchers', so it
//! can say which part of a change's delivery is serve's and which is the
//! transport's and its own client's. Off unless `omni serve
//! --delivery-trace FILE` asks for it; it costs a lock and a short write per line.

use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Where a change is when it is traced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Decoded by the shared broadcast consumer.
    Received,
    /// Encoded for a watcher and handed to gRPC.
    Sent,
}

/// The trace file, written through a buffer and flushed when the service stops.
#[derive(Debug)]
pub struct DeliveryTrace {
    out: Mutex<BufWriter<File>>,
}

impl DeliveryTrace {
    pub fn create(path: &Path) -> std::io::Result<DeliveryTrace> {
        Ok(DeliveryTrace { out: Mutex::new(BufWriter::with_capacity(1 << 20, File::create(path)?)) })
    }

    /// Notes a change at `mark` now: `r|s <version> <unix microseconds> <path>`
    /// (the path last, since it may hold spaces).
    pub fn note(&self, mark: Mark, path: &str, version: u64) {
        let micros = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros());
        let tag = match mark {
            Mark::Received => 'r',
            Mark::Sent => 's',
        };
        let mut out = self.out.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(error) = writeln!(out, "{tag} {version} {micros} {path}") {
            tracing::debug!(%error, "could not write the delivery trace");
        }
    }

    pub fn flush(&self) {
        let mut out = self.out.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(error) = out.flush() {
            tracing::warn!(%error, "could not flush the delivery trace");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_has_one_line_per_mark_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("trace");
        let trace = DeliveryTrace::create(&file).unwrap();
        trace.note(Mark::Received, "app/a/room/r", 3);
        trace.note(Mark::Sent, "app/a/room/r", 3);
        trace.flush();
        let text = std::fs::read_to_string(&file).unwrap();
        let lines: Vec<Vec<&str>> = text.lines().map(|l| l.splitn(4, ' ').collect()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!([lines[0][0], lines[0][1], lines[0][3]], ["r", "3", "app/a/room/r"]);
        assert_eq!([lines[1][0], lines[1][1], lines[1][3]], ["s", "3", "app/a/room/r"]);
        let (received, sent): (u128, u128) = (lines[0][2].parse().unwrap(), lines[1][2].parse().unwrap());
        assert!(received > 1_600_000_000_000_000 && sent >= received);
    }
}
