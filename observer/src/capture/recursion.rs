//! Drops the program never saw: the kernel skips a tracing program that would nest on one CPU
//! (a drop in an interrupt while the program runs for another) and only counts the skip in
//! `bpf_prog_info.recursion_misses`. Reporting those as a loss keeps "counted + lost =
//! dropped" true.
//!
//! The count is read from `/proc/self/fdinfo/<program fd>` (`recursion_misses:`, since 5.12),
//! which needs no extra privilege and no raw `bpf()` call. Kernels that do not report it (5.10)
//! yield `None`: the loss cannot be known there, and is not reported as zero.
use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::programs::ProgramFd;

/// The `recursion_misses` value of a program's fdinfo text, `None` when the kernel does not
/// report it.
pub fn parse_fdinfo(text: &str) -> Option<u64> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim() == "recursion_misses")
        .and_then(|(_, v)| v.trim().parse().ok())
}

/// Turns a cumulative kernel counter into deltas.
#[derive(Debug, Default)]
pub struct Deltas {
    last: u64,
}

impl Deltas {
    /// The increase since the previous call. A counter that went backwards (it belongs to a
    /// new program) counts from zero.
    pub fn update(&mut self, cumulative: u64) -> u64 {
        let delta = cumulative.checked_sub(self.last).unwrap_or(cumulative);
        self.last = cumulative;
        delta
    }
}

/// The attached program's recursion misses, as deltas.
#[derive(Debug)]
pub struct RecursionMisses {
    /// A duplicate of the attached program's descriptor (the program stays owned by the
    /// loader; this only names it in /proc).
    fd: ProgramFd,
    /// Its fdinfo file, kept open and re-read from the start at each drain: opening it by path
    /// every drain was a tenth of an idle daemon's pipeline time. `None` until first read, and
    /// again after a failed read (the next call reopens it).
    file: Option<std::fs::File>,
    buf: Vec<u8>,
    deltas: Deltas,
}

impl RecursionMisses {
    /// Tracks the program behind `fd`.
    pub fn new(fd: ProgramFd) -> Self {
        Self {
            fd,
            file: None,
            buf: Vec::new(),
            deltas: Deltas::default(),
        }
    }

    fn path(&self) -> String {
        format!("/proc/self/fdinfo/{}", self.fd.as_fd().as_raw_fd())
    }

    /// The fdinfo text, read from offset 0 of the open file (a seq_file regenerates its
    /// text for a read at 0).
    fn read(&mut self) -> std::io::Result<&str> {
        use std::os::unix::fs::FileExt as _;
        let file = match &self.file {
            Some(f) => f,
            None => self.file.insert(std::fs::File::open(self.path())?),
        };
        self.buf.clear();
        let mut chunk = [0u8; 1024];
        loop {
            let n = file.read_at(&mut chunk, self.buf.len() as u64)?;
            if n == 0 {
                break;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        std::str::from_utf8(&self.buf)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// Misses since the previous call; `None` when this kernel does not report them or the
    /// fdinfo file cannot be read.
    pub fn delta(&mut self) -> Option<u64> {
        let n = match self.read() {
            Ok(text) => parse_fdinfo(text),
            Err(_) => {
                self.file = None;
                return None;
            }
        };
        n.map(|n| self.deltas.update(n))
    }

    /// Whether this kernel reports recursion misses at all.
    pub fn supported(&self) -> bool {
        std::fs::read_to_string(self.path())
            .ok()
            .and_then(|t| parse_fdinfo(&t))
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Verbatim from Linux 6.18 (a tp_btf program).
    const FDINFO_6_18: &str = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t2091\nprog_type:\t26\nprog_jited:\t1\nprog_tag:\t8d3e1f4b1d9c0f0e\nmemlock:\t12288\nprog_id:\t412\nrun_time_ns:\t0\nrun_cnt:\t0\nrecursion_misses:\t7\nverified_insns:\t1795\n";

    /// 5.10 has no recursion_misses line.
    const FDINFO_5_10: &str = "pos:\t0\nflags:\t02000002\nmnt_id:\t13\nprog_type:\t5\nprog_jited:\t1\nprog_tag:\t8d3e1f4b1d9c0f0e\nmemlock:\t12288\nprog_id:\t20\nrun_time_ns:\t0\nrun_cnt:\t0\n";

    #[test]
    fn parses_the_field_where_the_kernel_has_it() {
        assert_eq!(parse_fdinfo(FDINFO_6_18), Some(7));
        assert_eq!(parse_fdinfo(FDINFO_5_10), None);
        assert_eq!(parse_fdinfo("recursion_misses:\tx\n"), None);
        assert_eq!(parse_fdinfo(""), None);
    }

    #[test]
    fn deltas_of_a_cumulative_counter() {
        let mut d = Deltas::default();
        assert_eq!(d.update(0), 0);
        assert_eq!(d.update(5), 5);
        assert_eq!(d.update(5), 0);
        assert_eq!(d.update(12), 7);
        // A new program's counter starts again from zero.
        assert_eq!(d.update(2), 2);
        assert_eq!(d.update(u64::MAX), u64::MAX - 2);
    }
}
