//! Process facts from the OS: open-files limit, resident memory and CPU time (`/proc`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Raises the soft open-files limit to the hard limit. Returns (soft, hard) after the attempt.
pub fn raise_nofile_limit() -> (u64, u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return (0, 0);
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                r.rlim_cur = r.rlim_max;
            }
        }
    }
    #[allow(clippy::unnecessary_cast)]
    let out = (r.rlim_cur as u64, r.rlim_max as u64);
    out
}

fn proc_path(pid: Option<u32>, file: &str) -> String {
    match pid {
        Some(p) => format!("/proc/{p}/{file}"),
        None => format!("/proc/self/{file}"),
    }
}

fn status_field_kb(pid: Option<u32>, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(proc_path(pid, "status")).ok()?;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(field) {
            let rest = rest.trim_start_matches(':').trim();
            let num = rest.split_whitespace().next()?;
            return num.parse().ok();
        }
    }
    None
}

/// Resident set size in KiB (`VmRSS`); `None` = this process.
pub fn rss_kb(pid: Option<u32>) -> Option<u64> {
    status_field_kb(pid, "VmRSS")
}

/// Anonymous resident memory in KiB (`RssAnon`): the heap and stacks, without mapped files (the
/// store's memory-mapped database pages count in `VmRSS`).
pub fn rss_anon_kb(pid: Option<u32>) -> Option<u64> {
    status_field_kb(pid, "RssAnon")
}

/// Peak resident set size in KiB since the process started (`VmHWM`).
pub fn hwm_kb(pid: Option<u32>) -> Option<u64> {
    status_field_kb(pid, "VmHWM")
}

/// User + system CPU seconds consumed so far (`/proc/<pid>/stat` utime + stime).
pub fn cpu_secs(pid: Option<u32>) -> Option<f64> {
    let text = std::fs::read_to_string(proc_path(pid, "stat")).ok()?;
    // The command name may contain spaces; fields after the last ')' are well formed.
    let after = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // after ')' field index 0 is `state` (field 3 overall); utime = field 14, stime = field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let tck = if tck > 0 { tck as f64 } else { 100.0 };
    Some((utime + stime) as f64 / tck)
}

/// Samples a process's RSS periodically and keeps the peak, until dropped.
pub struct RssSampler {
    peak: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    pub fn start(pid: u32, every: Duration) -> RssSampler {
        let peak = Arc::new(AtomicU64::new(rss_kb(Some(pid)).unwrap_or(0)));
        let p = peak.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                match rss_kb(Some(pid)) {
                    Some(kb) => {
                        p.fetch_max(kb, Ordering::Relaxed);
                    }
                    None => break,
                }
            }
        });
        RssSampler { peak, task }
    }

    pub fn peak_kb(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: one clock for every process on the machine, so times taken
/// by the bench's child processes and by the parent can be compared.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the struct we pass.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// RSS once it has stopped moving: sampled every 500 ms until the last 3 s of samples lie
/// within 1 % (or 512 KiB) of each other, or `max_wait` passed. Start-up allocations (password
/// hashing takes ~19 MiB) are released a few seconds late, and would otherwise count against
/// whatever is measured next.
pub async fn settled_rss_kb(pid: Option<u32>, max_wait: Duration) -> Option<u64> {
    let deadline = tokio::time::Instant::now() + max_wait;
    let mut samples: Vec<u64> = Vec::new();
    loop {
        let kb = rss_kb(pid)?;
        samples.push(kb);
        if samples.len() >= 7 {
            let last = &samples[samples.len() - 7..];
            let (lo, hi) = (
                *last.iter().min().unwrap_or(&kb),
                *last.iter().max().unwrap_or(&kb),
            );
            if hi - lo <= (hi / 100).max(512) {
                return Some(kb);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Some(kb);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
