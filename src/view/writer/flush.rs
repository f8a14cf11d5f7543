//! One flush: a batch of room writes and the markers, in one pipeline on
//! one server or spread over a cluster's masters, and what each reply means
//! (written, a room's own failure, Redis refusing every write, a lost script).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::pending::Waiting;
use super::{script, slots, RoomWrite, Writer, RESPONSE_TIMEOUT};
use crate::view::ViewConnection;

impl Writer {
    /// Writes a batch and then advances the markers: in one pipeline on one
    /// server; on a cluster, each room's script on its slot's master, all at
    /// once, and the markers once every room has answered.
    pub(super) async fn flush(&mut self, batch: Vec<RoomWrite>) {
        if self.connect().await.is_none() {
            self.requeue(batch);
            self.back_off().await;
            return;
        }
        if self.markers.placement_due() {
            self.place_markers().await;
        }
        let rooms: Vec<redis::Cmd> =
            batch.iter().map(|write| script::room_command(&self.script, &self.options, write)).collect();
        let (markers, values) = self.markers.commands(&self.marker_script);
        let started = Instant::now();
        let conn = self.connection.as_mut().expect("connected above");
        let replies = if conn.is_cluster() {
            // A cluster connection recovering from a dead master can keep
            // requests waiting past any response timeout: bounded here.
            tokio::time::timeout(RESPONSE_TIMEOUT, slots::send(conn, rooms, markers))
                .await
                .map_err(|_| slots::timed_out("a flush to the cluster"))
        } else {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for cmd in rooms.into_iter().chain(markers) {
                pipe.add_command(cmd);
            }
            // Markers last: Redis and its persistence keep a prefix of what
            // they ran, so a marker that survived vouches for every write before it.
            pipe.query_async::<Vec<redis::RedisResult<redis::Value>>>(conn).await
        };
        match replies {
            Ok(replies) => {
                metrics::histogram!("omni_redis_write_seconds").record(started.elapsed().as_secs_f64());
                self.backoff = Duration::from_millis(50);
                self.settle(batch, values, replies).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, rooms = batch.len(), "redis write failed; will retry");
                metrics::counter!("omni_redis_write_errors_total").increment(1);
                self.redis_failing(Some(&e));
                self.markers.unanswered(values);
                if self.connection.as_ref().is_some_and(ViewConnection::is_cluster) {
                    // A cluster connection that failed this way may stay stuck:
                    // the next flush discovers the cluster afresh.
                    self.connection = None;
                }
                self.requeue(batch);
                self.back_off().await;
            }
        }
    }

    /// On a cluster, reads which masters serve slots, for the markers.
    async fn place_markers(&mut self) {
        let Some(conn) = self.connection.as_mut().filter(|c| c.is_cluster()) else { return };
        let read = tokio::time::timeout(RESPONSE_TIMEOUT, slots::marker_slots(conn)).await;
        match read.unwrap_or_else(|_| Err(slots::timed_out("CLUSTER SLOTS"))) {
            Ok(slots) => self.markers.place(slots),
            // The markers stay where they were; the next check asks again.
            Err(error) => tracing::debug!(%error, "reading the cluster's slots failed"),
        }
    }

    /// Sorts out the replies: each room's, then each marker's.
    async fn settle(
        &mut self,
        batch: Vec<RoomWrite>,
        values: Vec<String>,
        mut replies: Vec<redis::RedisResult<redis::Value>>,
    ) {
        let marker_replies = replies.split_off(replies.len().saturating_sub(values.len()));
        let verdict = self.markers.answered(values, marker_replies);
        if verdict.lost {
            self.data_lost();
        }
        let mut missing_script = verdict.missing_script;
        let mut refused_all = None;
        let now = Instant::now();
        let mut written = 0;
        let mut again = Vec::new();
        for (write, reply) in batch.into_iter().zip(replies) {
            match reply {
                Ok(_) => {
                    written += 1;
                    self.pending.succeeded(&write.path);
                }
                Err(e) if is_no_script(&e) => {
                    missing_script = true;
                    again.push(write);
                }
                // Out of memory, read-only, loading…: no room's fault, so
                // none is held back alone; the whole writer backs off.
                Err(e) if refuses_every_write(&e) => {
                    refused_all = Some(e);
                    again.push(write);
                }
                Err(e) => self.room_failed(write, &e, now),
            }
        }
        metrics::counter!("omni_redis_rooms_written_total").increment(written);
        if missing_script {
            // Redis restarted, or its scripts were flushed: load them, try again.
            self.load_scripts().await;
        }
        self.requeue(again);
        match refused_all {
            Some(error) => {
                tracing::warn!(%error, backlog = self.pending.len(), "redis refuses writes; holding them");
                metrics::counter!("omni_redis_write_errors_total").increment(1);
                self.redis_failing(Some(&error));
                self.back_off().await;
            }
            None => self.redis_failing(None),
        }
    }

    fn data_lost(&mut self) {
        self.losses.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("omni_redis_resyncs_total").increment(1);
        tracing::warn!(
            "redis lost data (FLUSHALL, a restart without persistence, an older snapshot, or a failover \
             to a replica that missed writes); rewriting every room from the store"
        );
    }

    fn room_failed(&mut self, write: RoomWrite, error: &redis::RedisError, now: Instant) {
        metrics::counter!("omni_redis_room_failures_total").increment(1);
        let path = write.path.clone();
        let failures = self.pending.fail(Waiting::Write(write), now);
        if failures == 1 {
            tracing::warn!(%path, %error, "redis refused a room's write; retrying that room alone, with back-off");
        }
    }

    async fn load_scripts(&mut self) {
        if let Some(conn) = &mut self.connection {
            for script in [&self.script, &self.marker_script] {
                if let Err(e) = script.prepare_invoke().load_async(conn).await {
                    tracing::warn!(error = %e, "loading a script into redis failed");
                }
            }
        }
    }

    pub(super) fn requeue(&mut self, batch: Vec<RoomWrite>) {
        for write in batch.into_iter().rev() {
            self.pending.requeue(Waiting::Write(write));
        }
    }

    async fn connect(&mut self) -> Option<()> {
        if self.connection.is_none() {
            let connecting = tokio::time::timeout(RESPONSE_TIMEOUT, self.client.connect_managed(RESPONSE_TIMEOUT));
            match connecting.await.unwrap_or_else(|_| Err(slots::timed_out("connecting"))) {
                Ok(conn) => self.connection = Some(conn),
                Err(e) => {
                    metrics::counter!("omni_redis_write_errors_total").increment(1);
                    self.redis_failing(Some(&e));
                    tracing::warn!(error = %e, backlog = self.pending.len(), "redis unreachable; holding writes");
                    return None;
                }
            }
        }
        Some(())
    }
}

/// Errors Redis gives every write while it lasts, whatever the room.
fn refuses_every_write(error: &redis::RedisError) -> bool {
    matches!(
        error.code(),
        Some(
            "OOM"
                | "READONLY"
                | "LOADING"
                | "BUSY"
                | "MASTERDOWN"
                | "TRYAGAIN"
                | "CLUSTERDOWN"
                | "NOPERM"
                | "MISCONF"
                // A slot whose master is failing over, as the cluster client gives up on it.
                | "MOVED"
                | "ASK"
        )
    ) || error.is_io_error()
        // A cluster's master failing over: its slots have no node for a moment.
        || error.kind() == redis::ErrorKind::ClusterConnectionNotFound
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
}

pub(super) fn is_no_script(error: &redis::RedisError) -> bool {
    error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}
