//! omni under measurement: a child `omni run` process, its CPU time and
//! peak RSS from /proc, its metrics endpoint, and its group's progress.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use omni::kafka::KafkaSettings;
use omni::topology::Topology;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

pub struct OmniProcess {
    child: Child,
    http: String,
    log: std::path::PathBuf,
}

/// Restore figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    pub records: u64,
    pub seconds: f64,
    pub records_per_s: f64,
    /// From process start to ready, including joining the group.
    pub seconds_to_ready: f64,
}

impl OmniProcess {
    pub fn spawn(topology: &Topology, dir: &Path) -> anyhow::Result<OmniProcess> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let http = format!("127.0.0.1:{port}");
        let file = dir.join("topology.toml");
        std::fs::write(&file, toml::to_string(topology)?)?;
        let log_path = dir.join("omni.log");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let child = Command::new(std::env::current_exe()?)
            .args(["run", "--topology"])
            .arg(&file)
            .args(["--http-listen", &http])
            // The topology file says everything: no setting of the bench's environment overrides it.
            .env_remove("OMNI_STATE_DIR")
            .env_remove("OMNI_BROKERS")
            .env_remove("OMNI_REDIS_URL")
            .env_remove("OMNI_COMMIT_INTERVAL_MS")
            .env_remove("OMNI_INSTANCE_ID")
            .env_remove("OMNI_THREADS")
            .env_remove("OMNI_KEY_PREFIX")
            .env_remove("OMNI_HTTP_LISTEN")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        Ok(OmniProcess { child, http, log: log_path })
    }

    fn proc_file(&self, name: &str) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(format!("/proc/{}/{name}", self.child.id()))?)
    }

    /// User plus system CPU time so far.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds_of(self.child.id())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's peak resident set size.
    pub fn peak_rss_bytes(&self) -> anyhow::Result<u64> {
        self.status_bytes("VmHWM:")
    }

    /// The process's resident set size now.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        self.status_bytes("VmRSS:")
    }

    /// A size in kB from /proc/<pid>/status, in bytes.
    fn status_bytes(&self, field: &str) -> anyhow::Result<u64> {
        let status = self.proc_file("status")?;
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0);
        Ok(kib * 1024)
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(&self.http).await.ok()?;
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.http).as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        let status = response.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, response))
    }

    async fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics").await?;
        body.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
    }

    /// Unlabelled metrics read from one scrape, in the order of `names`.
    pub async fn metrics(&self, names: &[&str]) -> Vec<Option<f64>> {
        let body = self.get("/metrics").await.map(|(_, body)| body).unwrap_or_default();
        let value = |name: &str| body.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()));
        names.iter().map(|name| value(name)).collect()
    }

    /// A histogram's running sum and count.
    pub async fn histogram_totals(&self, name: &str) -> Option<HistogramTotals> {
        let sum = self.metric(&format!("{name}_sum")).await?;
        let count = self.metric(&format!("{name}_count")).await?;
        Some(HistogramTotals { sum, count })
    }

    /// Times the restore: from all partitions assigned to ready.
    pub async fn time_restore(&self, partitions: i32) -> anyhow::Result<RestoreReport> {
        let spawned = Instant::now();
        let deadline = spawned + Duration::from_secs(600);
        let mut assigned_at = None;
        loop {
            anyhow::ensure!(Instant::now() < deadline, "omni did not get ready within 10 minutes");
            if assigned_at.is_none() && self.metric("omni_assigned_partitions").await == Some(f64::from(partitions)) {
                assigned_at = Some(Instant::now());
            }
            if matches!(self.get("/readyz").await, Some((200, _))) {
                let ready = Instant::now();
                let records = self.metric("omni_restored_records_total").await.unwrap_or(0.0) as u64;
                let seconds = (ready - assigned_at.unwrap_or(spawned)).as_secs_f64().max(0.001);
                return Ok(RestoreReport {
                    records,
                    seconds,
                    records_per_s: records as f64 / seconds,
                    seconds_to_ready: (ready - spawned).as_secs_f64(),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// kill -9, then reaps the process.
    pub fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM, then waits for the clean exit.
    pub fn terminate(mut self) -> anyhow::Result<()> {
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status()?;
        let status = self.child.wait()?;
        if !status.success() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            anyhow::bail!("omni run exited with {status}; the end of its log:\n{}", tail.join("\n"));
        }
        Ok(())
    }
}

/// A bench that stops on an error leaves no omni behind.
impl Drop for OmniProcess {
    fn drop(&mut self) {
        // After `terminate` the child is reaped, and both calls do nothing.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// User plus system CPU time of a process so far.
pub fn cpu_seconds_of(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    Ok(ticks / 100.0)
}

/// The running sum and count of a Prometheus histogram.
#[derive(Debug, Clone, Copy)]
pub struct HistogramTotals {
    sum: f64,
    count: f64,
}

impl HistogramTotals {
    /// The mean of what was recorded since `earlier`, in milliseconds.
    pub fn mean_ms_since(self, earlier: HistogramTotals) -> Option<f64> {
        let count = self.count - earlier.count;
        (count > 0.0).then(|| (self.sum - earlier.sum) / count * 1000.0)
    }
}

/// A consumer that can read a group's committed offsets.
pub fn group_reader(kafka: &KafkaSettings, group: &str) -> anyhow::Result<BaseConsumer> {
    Ok(kafka.client_config().set("group.id", group).set("enable.auto.commit", "false").create()?)
}

/// The sum of the group's committed offsets over every partition of `topic`.
pub fn committed_total(reader: &BaseConsumer, topic: &str) -> anyhow::Result<u64> {
    let metadata = reader.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut list = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            list.add_partition(topic, p.id());
        }
    }
    let committed = reader.committed_offsets(list, Duration::from_secs(10))?;
    Ok(committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o.max(0) as u64,
            _ => 0,
        })
        .sum())
}
