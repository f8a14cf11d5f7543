//! `omni health`: asks a running omni's operations endpoint whether it is
//! alive (`/healthz`) or ready (`/readyz`), and says so in its exit code.
//! It exists for container health checks: the slim image has no curl, and
//! Docker's `HEALTHCHECK` reads exit 0 as healthy and 1 as unhealthy.

use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where the endpoint is when neither `--addr` nor `OMNI_HTTP_LISTEN` says: the image's port.
const DEFAULT_ADDR: &str = "127.0.0.1:9464";

/// Ask a running omni's /healthz (or /readyz); exit 0 on 200, 1 otherwise.
#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    /// The operations endpoint (host:port). Defaults to OMNI_HTTP_LISTEN, the
    /// address `omni run` listens on, with a wildcard host (0.0.0.0, [::])
    /// asked on loopback; without it, 127.0.0.1:9464.
    #[arg(long)]
    addr: Option<String>,
    /// Ask /readyz (joined, restored, consuming) instead of /healthz (alive, no stalled thread).
    #[arg(long)]
    ready: bool,
    /// Give up, unhealthy, after this many seconds without an answer.
    #[arg(long, default_value_t = 5)]
    timeout_secs: u64,
}

/// Prints the endpoint's answer and returns the exit code: 0 for a 200, 1 for
/// any other status. An endpoint that cannot be reached is an error (exit 1).
pub async fn run(args: HealthArgs) -> anyhow::Result<u8> {
    let addr = match args.addr {
        Some(addr) => addr,
        None => endpoint_from_listen(std::env::var("OMNI_HTTP_LISTEN").ok().as_deref())?,
    };
    let path = if args.ready { "/readyz" } else { "/healthz" };
    let timeout = Duration::from_secs(args.timeout_secs);
    let (status, body) = tokio::time::timeout(timeout, get(&addr, path))
        .await
        .map_err(|_| anyhow::anyhow!("http://{addr}{path} did not answer within {} s", args.timeout_secs))??;
    if status == 200 {
        println!("{}", body.trim_end());
        Ok(super::exit::OK)
    } else {
        eprintln!("unhealthy: http://{addr}{path} answered {status}: {}", body.trim_end());
        Ok(super::exit::ERROR)
    }
}

/// The address to ask, given the one `omni run` listens on.
fn endpoint_from_listen(listen: Option<&str>) -> anyhow::Result<String> {
    let Some(listen) = listen.filter(|l| !l.is_empty()) else {
        return Ok(DEFAULT_ADDR.to_owned());
    };
    let Some((host, port)) = listen.rsplit_once(':') else {
        bail!("OMNI_HTTP_LISTEN={listen} has no port; pass --addr host:port");
    };
    if port == "0" {
        bail!("OMNI_HTTP_LISTEN={listen} picks a random port; pass --addr with the one omni run logged");
    }
    let host = match host {
        "0.0.0.0" | "" => "127.0.0.1",
        "[::]" => "[::1]",
        other => other,
    };
    Ok(format!("{host}:{port}"))
}

/// One HTTP/1.1 GET: the status code and the body.
pub(super) async fn get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream =
        tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to http://{addr}{path}"))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.with_context(|| format!("sending to http://{addr}{path}"))?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.with_context(|| format!("reading http://{addr}{path}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status =
        head.split_whitespace().nth(1).and_then(|code| code.parse().ok()).with_context(|| {
            format!("http://{addr}{path} did not answer HTTP: {:?}", head.lines().next().unwrap_or(""))
        })?;
    Ok((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::endpoint_from_listen;

    #[test]
    fn the_listen_address_is_asked_on_loopback_when_it_is_a_wildcard() {
        assert_eq!(endpoint_from_listen(None).unwrap(), "127.0.0.1:9464");
        assert_eq!(endpoint_from_listen(Some("0.0.0.0:9464")).unwrap(), "127.0.0.1:9464");
        assert_eq!(endpoint_from_listen(Some("[::]:9000")).unwrap(), "[::1]:9000");
        assert_eq!(endpoint_from_listen(Some("10.0.0.7:9464")).unwrap(), "10.0.0.7:9464");
        assert!(endpoint_from_listen(Some("127.0.0.1:0")).unwrap_err().to_string().contains("--addr"));
        assert!(endpoint_from_listen(Some("nonsense")).is_err());
    }
}
