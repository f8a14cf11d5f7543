//! The writer task's loop: takes live writes and rewrites in, batches
//! them, and keeps going while Redis fails (backing off, holding writes
//! bounded in bytes, shedding them past the budget), and reloads from the
//! store the rooms that waited with only their path.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::marker::MARKER_CHECK;
use super::pending::{self, Pending, Place, Waiting};
use super::{RoomWrite, Writer, PIPELINE_BYTES};

/// What a waiting writer woke up for.
enum Wake {
    Live(Option<Vec<RoomWrite>>),
    Rewrite(Option<Vec<RoomWrite>>),
    Tick,
}

impl Writer {
    pub(super) async fn run(mut self) {
        loop {
            if self.idle() {
                if self.live.is_none() && self.rewrites.is_none() && self.pending.is_empty() {
                    return;
                }
                self.wait_for_work().await;
            }
            self.take_in();
            self.report_backlog();
            if self.idle() {
                if self.markers.checked.elapsed() >= MARKER_CHECK && (self.live.is_some() || self.rewrites.is_some()) {
                    self.flush(Vec::new()).await;
                }
                continue;
            }
            let batch = self.pending.take(self.options.batch_rooms, PIPELINE_BYTES, Instant::now());
            let batch = self.reload(batch);
            if batch.is_empty() && self.markers.checked.elapsed() < MARKER_CHECK {
                continue;
            }
            self.flush(batch).await;
            self.report_backlog();
        }
    }

    /// Nothing to write now: no room waits, or every one backs off after a failure.
    fn idle(&self) -> bool {
        let backing_off =
            || self.pending.only_failing() && self.pending.next_retry().is_some_and(|at| at > Instant::now());
        self.pending.is_empty() || backing_off()
    }

    /// Waits for new writes, a failing room's retry, or the next marker check.
    async fn wait_for_work(&mut self) {
        let next_check = self.markers.checked + MARKER_CHECK;
        let until = self.pending.next_retry().map_or(next_check, |retry| retry.min(next_check));
        let sleep = tokio::time::sleep_until(until.into());
        let (live_open, rewrites_open) = (self.live.is_some(), self.rewrites.is_some());
        let wake = tokio::select! {
            writes = recv_unbounded(&mut self.live), if live_open => Wake::Live(writes),
            writes = recv_bounded(&mut self.rewrites), if rewrites_open => Wake::Rewrite(writes),
            () = sleep => Wake::Tick,
        };
        match wake {
            Wake::Live(Some(writes)) => self.absorb_live(writes),
            Wake::Live(None) => self.live = None,
            Wake::Rewrite(Some(writes)) => self.absorb_rewrites(writes),
            Wake::Rewrite(None) => self.rewrites = None,
            Wake::Tick => {}
        }
    }

    /// Takes every live write that arrived, and a batch of rewrites when
    /// few live writes wait: live writes go first.
    fn take_in(&mut self) {
        while let Some(Ok(writes)) = self.live.as_mut().map(|live| live.try_recv()) {
            self.absorb_live(writes);
        }
        if self.pending.len() < self.options.batch_rooms / 2 {
            if let Some(Ok(writes)) = self.rewrites.as_mut().map(|r| r.try_recv()) {
                self.absorb_rewrites(writes);
            }
        }
    }

    pub(super) fn absorb_live(&mut self, writes: Vec<RoomWrite>) {
        self.pressure.queued.fetch_sub(writes.iter().map(pending::write_bytes).sum(), Ordering::Relaxed);
        self.pending.absorb_all(writes);
    }

    fn absorb_rewrites(&mut self, writes: Vec<RoomWrite>) {
        for write in writes {
            self.pending.absorb(Waiting::Write(write), Place::Back);
        }
    }

    fn report_backlog(&self) {
        self.pressure.bytes.store(self.pending.bytes(), Ordering::Relaxed);
        self.status.backlog_rooms.store(self.pending.len(), Ordering::Relaxed);
        metrics::gauge!("omni_redis_backlog_rooms").set(self.pending.len() as f64);
        metrics::gauge!("omni_redis_backlog_bytes").set(self.pending.bytes() as f64);
    }

    /// Records whether Redis takes writes (`None`) or why not, for the
    /// runtime's backpressure and the operations endpoint. Back from a
    /// failure during which the backlog was shed, it owes a rewrite of every room.
    pub(super) fn redis_failing(&mut self, error: Option<&dyn std::fmt::Display>) {
        self.pressure.failing.store(error.is_some(), Ordering::Relaxed);
        match error {
            Some(error) => self.status.failed(error),
            None => self.status.succeeded(),
        }
        if error.is_none() && self.rewrite_owed {
            self.rewrite_owed = false;
            self.losses.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("omni_redis_resyncs_total").increment(1);
            tracing::warn!("redis takes writes again after its backlog was shed; rewriting every room from the store");
        }
    }

    /// While Redis fails, drops the backlog once it passes its budget by a
    /// quarter, for a rewrite from the store when Redis is back: a Redis
    /// outage neither holds the job back nor grows its memory. Only with a
    /// store to rewrite from.
    fn shed_if_over_budget(&mut self) {
        let budget = self.options.backlog_bytes;
        if self.stored.is_none() || self.pending.bytes() <= budget + budget / 4 {
            return;
        }
        let rooms = self.pending.len();
        self.pending = Pending::new(self.pending.bounds());
        self.rewrite_owed = true;
        metrics::counter!("omni_redis_backlog_shed_rooms_total").increment(rooms as u64);
        tracing::warn!(
            rooms,
            "redis is failing and its backlog passed the budget; shed it for a rewrite from the store"
        );
        self.report_backlog();
    }

    /// Reads back the state of rooms that waited with only their path. A
    /// room the store has not caught up with yet (the store takes a commit
    /// just after Redis does), older there or not there at all when new,
    /// waits again, a moment, a bounded number of times. Past that, the
    /// store is not going to catch up here (the partition moved, and its
    /// new owner writes Redis from its own store): what it holds goes.
    fn reload(&mut self, batch: Vec<Waiting>) -> Vec<RoomWrite> {
        let mut writes = Vec::with_capacity(batch.len());
        let now = Instant::now();
        for waiting in batch {
            match waiting {
                Waiting::Write(write) => writes.push(write),
                Waiting::Reload { path, version, partition } => {
                    let stored = self.stored.as_ref().and_then(|s| s.room(&path, partition));
                    let behind = stored.as_ref().is_none_or(|write| write.version < version);
                    if behind && self.pending.defer(Waiting::Reload { path: path.clone(), version, partition }, now) {
                        continue;
                    }
                    match stored {
                        Some(write) => writes.push(write),
                        None => {
                            tracing::warn!(%path, partition, version, "the store never held a room waiting for redis; it is left to the partition's owner");
                            self.pending.succeeded(&path);
                        }
                    }
                }
            }
        }
        writes
    }

    /// Backs off before a retry while still taking in new writes.
    pub(super) async fn back_off(&mut self) {
        let deadline = tokio::time::Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(2));
        loop {
            self.shed_if_over_budget();
            let Some(live) = &mut self.live else {
                tokio::time::sleep_until(deadline).await;
                return;
            };
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => return,
                writes = live.recv() => match writes {
                    Some(writes) => self.absorb_live(writes),
                    None => self.live = None,
                },
            }
        }
    }
}

async fn recv_unbounded(rx: &mut Option<mpsc::UnboundedReceiver<Vec<RoomWrite>>>) -> Option<Vec<RoomWrite>> {
    rx.as_mut()?.recv().await
}

async fn recv_bounded(rx: &mut Option<mpsc::Receiver<Vec<RoomWrite>>>) -> Option<Vec<RoomWrite>> {
    rx.as_mut()?.recv().await
}
