//! The standard Prometheus process metrics (`process_*`, as every official
//! client library exports them), read from Linux's `/proc/self` at each
//! scrape, so a dashboard shows omni's CPU, memory and file descriptors
//! beside its own figures without a node exporter.
//!
//! The metrics crate's counters hold integers, so the CPU seconds (a
//! fraction) are set as a gauge under the conventional counter name; rate()
//! reads it the same. Elsewhere than Linux the series are simply absent.

use std::fs;

/// Clock ticks per second in `/proc` times: the kernel's USER_HZ, 100 on
/// every Linux architecture (Prometheus' own procfs library assumes it too).
const TICKS_PER_SECOND: f64 = 100.0;

/// Registers the help texts; call once with the other descriptions.
pub fn describe() {
    use metrics::describe_gauge;
    describe_gauge!("process_cpu_seconds_total", "User and system CPU time spent, in seconds.");
    describe_gauge!("process_resident_memory_bytes", "Resident memory size in bytes.");
    describe_gauge!("process_resident_memory_max_bytes", "Peak resident memory size in bytes (VmHWM).");
    describe_gauge!("process_virtual_memory_bytes", "Virtual memory size in bytes.");
    describe_gauge!("process_open_fds", "Open file descriptors.");
    describe_gauge!("process_max_fds", "Maximum number of open file descriptors.");
    describe_gauge!("process_threads", "OS threads in the process.");
    describe_gauge!("process_start_time_seconds", "Start time of the process since the Unix epoch, in seconds.");
}

/// Reads `/proc/self` and sets the gauges; whatever cannot be read is left as it was.
pub fn record() {
    if let Some(stat) = read_stat() {
        metrics::gauge!("process_cpu_seconds_total").set((stat.utime + stat.stime) as f64 / TICKS_PER_SECOND);
        if let Some(boot) = boot_time() {
            metrics::gauge!("process_start_time_seconds").set(boot + stat.starttime as f64 / TICKS_PER_SECOND);
        }
    }
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        let field = |name| status_field(&status, name);
        if let Some(kib) = field("VmRSS") {
            metrics::gauge!("process_resident_memory_bytes").set((kib * 1024) as f64);
        }
        if let Some(kib) = field("VmHWM") {
            metrics::gauge!("process_resident_memory_max_bytes").set((kib * 1024) as f64);
        }
        if let Some(kib) = field("VmSize") {
            metrics::gauge!("process_virtual_memory_bytes").set((kib * 1024) as f64);
        }
        if let Some(threads) = field("Threads") {
            metrics::gauge!("process_threads").set(threads as f64);
        }
    }
    if let Ok(fds) = fs::read_dir("/proc/self/fd") {
        metrics::gauge!("process_open_fds").set(fds.count() as f64);
    }
    if let Some(max) = fs::read_to_string("/proc/self/limits").ok().and_then(|l| max_open_files(&l)) {
        metrics::gauge!("process_max_fds").set(max as f64);
    }
}

/// The fields of `/proc/self/stat` used here, in clock ticks.
struct Stat {
    utime: u64,
    stime: u64,
    starttime: u64,
}

fn read_stat() -> Option<Stat> {
    parse_stat(&fs::read_to_string("/proc/self/stat").ok()?)
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses
/// and may hold spaces, so fields are counted from after its closing one.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    // After the name: field 3 (state) is index 0, so field n is index n - 3.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse().ok();
    Some(Stat { utime: field(14)?, stime: field(15)?, starttime: field(22)? })
}

/// The machine's boot time (seconds since the epoch), from `/proc/stat`.
fn boot_time() -> Option<f64> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    stat.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()
}

/// A numeric field of `/proc/self/status`, e.g. `VmRSS:  1234 kB` → 1234.
fn status_field(status: &str, name: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.split(':').next() == Some(name))?;
    line.split(':').nth(1)?.split_whitespace().next()?.parse().ok()
}

/// The soft limit of `Max open files` in `/proc/self/limits`.
fn max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_a_command_name_with_spaces_and_parentheses() {
        let text = "4242 (omni (x) y) S 1 2 3 4 5 6 7 8 9 10 1500 250 0 0 20 0 9 0 777 1000 50";
        let stat = parse_stat(text).unwrap();
        assert_eq!((stat.utime, stat.stime, stat.starttime), (1500, 250, 777));
        assert!(parse_stat("4242 (short) S 1 2").is_none());
    }

    #[test]
    fn status_and_limits_lines_are_read_by_name() {
        let status = "Name:\tomni\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nThreads:\t17\n";
        assert_eq!(status_field(status, "VmRSS"), Some(1024));
        assert_eq!(status_field(status, "VmHWM"), Some(2048));
        assert_eq!(status_field(status, "Threads"), Some(17));
        assert_eq!(status_field(status, "VmSize"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(max_open_files(limits), Some(1024));
    }

    #[test]
    fn this_process_can_be_read() {
        let stat = read_stat().expect("/proc/self/stat");
        assert!(stat.starttime > 0);
        let status = fs::read_to_string("/proc/self/status").unwrap();
        assert!(status_field(&status, "VmRSS").unwrap() > 0);
        assert!(max_open_files(&fs::read_to_string("/proc/self/limits").unwrap()).unwrap() > 0);
        assert!(boot_time().unwrap() > 1_000_000_000.0);
    }
}
