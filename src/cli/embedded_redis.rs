//! A throwaway `redis-server` on a free loopback port, for the demo and the benchmark.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct EmbeddedRedis {
    pub url: String,
    child: Child,
}

impl Drop for EmbeddedRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts redis-server in `dir`, or returns `None` when it is not installed or does not come up.
pub async fn start(dir: &Path) -> Option<EmbeddedRedis> {
    let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
    let mut command = Command::new("redis-server");
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own process group: a Ctrl-C meant for omni must not kill Redis
        // before omni has flushed its last writes to it.
        .process_group(0);
    // Yet it must never outlive omni, however omni ends (a second Ctrl-C, a
    // kill -9): the kernel kills it when the thread that started it exits.
    // That is the main thread, which runs the command's future (`block_on`)
    // and so lives as long as the process.
    // SAFETY: prctl is async-signal-safe, and the closure touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().ok()?;
    let redis = EmbeddedRedis { url: format!("redis://127.0.0.1:{port}"), child };
    let client = redis::Client::open(redis.url.as_str()).ok()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
            if redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok() {
                return Some(redis);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}
