//! The `GetSnapshot` phase: calls at a fixed rate over four connections, on
//! rooms the job wrote, each call's latency from its start to its answer in
//! the bench. With several builds, they take turns in short slices (the
//! others idle meanwhile), so each meets the same machine load; each build's
//! figures cover all its slices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use omni::proto::omni::omni_client::OmniClient;
use omni::proto::omni::{self as pb};
use tonic::transport::Channel;

use super::{connect, CpuClock, CpuShare, LoadAverage, LoadDuring, ServeProcess, ROOM_PREFIX};
use crate::cli::bench::latency::Percentiles;
use crate::cli::bench::BenchArgs;

/// Connections `GetSnapshot` calls are spread over.
const CONNECTIONS: usize = 4;

/// How long one build is asked before the next takes its turn: short, so
/// the machine's other load falls on every build alike.
const SLICE: Duration = Duration::from_millis(500);

/// Figures of the phase for one build.
#[derive(Debug, serde::Serialize)]
pub struct SnapshotPhase {
    serve: &'static str,
    target_requests_per_s: u64,
    achieved_requests_per_s: f64,
    load_average: LoadDuring,
    /// Failed calls, by status code (NOT_FOUND, the answer for a room the
    /// workload closed, is an answer, timed with the others).
    errors: BTreeMap<String, usize>,
    pub latency: Percentiles,
    /// Over this build's slices, in cores.
    cpu: CpuShare,
    /// Serve's CPU per call, in microseconds: steadier than the latency on a
    /// shared machine.
    pub serve_cpu_us_per_call: f64,
}

/// One build's calls and what they measured so far.
struct Target<'a> {
    serve: &'a ServeProcess,
    clients: Vec<OmniClient<Channel>>,
    samples: Arc<Mutex<Vec<f64>>>,
    errors: Arc<Mutex<BTreeMap<String, usize>>>,
    sent: u64,
    asking: Duration,
    cpu: CpuShare,
}

pub async fn phase(
    args: &BenchArgs,
    serves: &[ServeProcess],
    job_pid: u32,
    rooms: &[u32],
) -> anyhow::Result<Vec<SnapshotPhase>> {
    anyhow::ensure!(!rooms.is_empty(), "no room was written: no room to ask for");
    // Each fresh serve first reads the broadcast's last minute, which would
    // weigh on whichever build is being asked.
    for serve in serves {
        super::watch::caught_up(serve.pid()).await;
    }
    let mut targets = Vec::new();
    for serve in serves {
        let mut clients = Vec::new();
        for _ in 0..CONNECTIONS {
            clients.push(connect(&serve.addr).await?);
        }
        targets.push(Target {
            serve,
            clients,
            samples: Arc::default(),
            errors: Arc::default(),
            sent: 0,
            asking: Duration::ZERO,
            cpu: CpuShare::default(),
        });
    }
    let load_start = LoadAverage::now();
    let per_build = Duration::from_secs(args.service_snapshot_secs);
    let mut turn = 0;
    while targets.iter().any(|t| t.asking < per_build) {
        let target = &mut targets[turn % serves.len()];
        turn += 1;
        if target.asking < per_build {
            let slice = SLICE.min(per_build - target.asking);
            ask(target, job_pid, args.service_snapshot_rate, rooms, slice).await;
        }
    }
    let load = LoadDuring { start: load_start, end: LoadAverage::now() };
    Ok(targets
        .into_iter()
        .map(|target| {
            let achieved = target.sent as f64 / target.asking.as_secs_f64().max(1e-3);
            SnapshotPhase {
                serve: target.serve.label,
                target_requests_per_s: args.service_snapshot_rate,
                achieved_requests_per_s: achieved,
                load_average: load,
                errors: std::mem::take(&mut *target.errors.lock().expect("errors")),
                latency: Percentiles::of(std::mem::take(&mut *target.samples.lock().expect("samples"))),
                serve_cpu_us_per_call: target.cpu.serve / achieved.max(1.0) * 1e6,
                cpu: target.cpu,
            }
        })
        .collect())
}

/// Asks `target` for `slice` at `rate` calls per second, then waits for every answer.
async fn ask(target: &mut Target<'_>, job_pid: u32, rate: u64, rooms: &[u32], slice: Duration) {
    let cpu_start = CpuClock::now(target.serve.pid(), job_pid);
    let started = Instant::now();
    let mut sent = 0u64;
    let mut calls = Vec::new();
    while started.elapsed() < slice {
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            let mut client = target.clients[sent as usize % target.clients.len()].clone();
            let (samples, errors) = (Arc::clone(&target.samples), Arc::clone(&target.errors));
            let path = format!("{ROOM_PREFIX}{}", rooms[(target.sent + sent) as usize % rooms.len()]);
            calls.push(tokio::spawn(async move {
                let asked = Instant::now();
                match client.get_snapshot(pb::GetSnapshotRequest { path }).await.map_err(|s| (s.code(), s)) {
                    // A room the workload closed is answered NOT_FOUND, rightly.
                    Ok(_) | Err((tonic::Code::NotFound, _)) => {
                        samples.lock().expect("samples").push(asked.elapsed().as_secs_f64() * 1000.0)
                    }
                    Err((_, status)) => {
                        let code = omni::serve::code_name(status.code()).to_owned();
                        *errors.lock().expect("errors").entry(code).or_default() += 1;
                    }
                }
            }));
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let asked_for = started.elapsed();
    for call in calls {
        let _ = call.await;
    }
    let share = CpuClock::now(target.serve.pid(), job_pid).share_since(&cpu_start);
    // Averaged over the build's slices, weighted by their lengths.
    let (before, now) = (target.asking.as_secs_f64(), asked_for.as_secs_f64());
    let mix = |old: f64, new: f64| (old * before + new * now) / (before + now);
    target.cpu = CpuShare {
        machine_cores: share.machine_cores,
        serve: mix(target.cpu.serve, share.serve),
        job: mix(target.cpu.job, share.job),
        bench: mix(target.cpu.bench, share.bench),
    };
    target.sent += sent;
    target.asking += asked_for;
}
