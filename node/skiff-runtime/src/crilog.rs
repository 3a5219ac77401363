//! Container logs in the CRI format the kubelet reads
//! (`<RFC 3339 nano timestamp> <stdout|stderr> <F|P> <content>`, one line per record, `P` for a
//! partial line that the next record continues), written by a logging binary that the runc shim
//! starts with the container (`binary://` stdio URIs): the shim hands it the container's stdout
//! and stderr as file descriptors 3 and 4 and waits until it closes descriptor 5. The binary
//! belongs to the shim, not the agent, so logs keep flowing while the agent restarts.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    os::fd::FromRawFd,
    path::Path,
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result, bail};
use chrono::{DateTime, SecondsFormat, Utc};

/// Longest content of one record; longer lines are split into partial records (as CRI).
pub const MAX_RECORD: usize = 16 * 1024;

/// The query key of the logging binary's URI; the shim passes it and its value as the binary's
/// two arguments (`<binary> container-log <path>`).
pub const SUBCOMMAND: &str = "container-log";

/// The stdio URI that makes the shim run `binary` to write `log`.
pub fn binary_uri(binary: &Path, log: &Path) -> String {
    let enc = |p: &Path| {
        p.display()
            .to_string()
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    format!("binary://{}?{SUBCOMMAND}={}", enc(binary), enc(log))
}

/// One record.
#[derive(Clone, Debug, PartialEq)]
pub struct Record<'a> {
    /// When the runtime read it.
    pub time: DateTime<Utc>,
    /// The timestamp as written (RFC 3339 with nanoseconds).
    pub time_text: &'a str,
    /// `stdout` or `stderr`.
    pub stream: &'a str,
    /// Whether the line continues in the next record.
    pub partial: bool,
    /// The content, without the line's end.
    pub content: &'a [u8],
}

/// Parses one line (without its `\n`).
pub fn parse(line: &[u8]) -> Option<Record<'_>> {
    let mut parts = line.splitn(4, |b| *b == b' ');
    let time_text = std::str::from_utf8(parts.next()?).ok()?;
    let stream = std::str::from_utf8(parts.next()?).ok()?;
    let tag = parts.next()?;
    let content = parts.next().unwrap_or_default();
    if stream != "stdout" && stream != "stderr" {
        return None;
    }
    let time = DateTime::parse_from_rfc3339(time_text)
        .ok()?
        .with_timezone(&Utc);
    Some(Record {
        time,
        time_text,
        stream,
        partial: tag.first() == Some(&b'P'),
        content,
    })
}

/// Formats one record.
pub fn format(time: DateTime<Utc>, stream: &str, partial: bool, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 48);
    out.extend_from_slice(time.to_rfc3339_opts(SecondsFormat::Nanos, true).as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.as_bytes());
    out.extend_from_slice(if partial { b" P " } else { b" F " });
    out.extend_from_slice(content);
    out.push(b'\n');
    out
}

fn copy(input: impl Read, stream: &'static str, out: &Arc<Mutex<File>>) -> Result<()> {
    let mut r = BufReader::with_capacity(64 * 1024, input);
    let mut line = Vec::with_capacity(MAX_RECORD);
    loop {
        line.clear();
        let n = r
            .by_ref()
            .take(MAX_RECORD as u64)
            .read_until(b'\n', &mut line)
            .with_context(|| format!("read the container's {stream}"))?;
        if n == 0 {
            return Ok(());
        }
        let complete = line.last() == Some(&b'\n');
        if complete {
            line.pop();
        }
        let record = format(Utc::now(), stream, !complete, &line);
        out.lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_all(&record)
            .context("write the log")?;
    }
}

/// The logging binary: copies descriptors 3 (stdout) and 4 (stderr) into `path` as records
/// until both end, after telling the shim it is ready by closing descriptor 5.
pub fn run_driver(path: &Path) -> Result<()> {
    for fd in 3..=5 {
        if nix::fcntl::fcntl(
            // SAFETY: only checks whether the descriptor is open; it is not used or closed.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
            nix::fcntl::FcntlArg::F_GETFD,
        )
        .is_err()
        {
            bail!(
                "{SUBCOMMAND} is run by the runc shim with the container's streams as descriptors 3 and 4 and a ready pipe as 5"
            );
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let out = Arc::new(Mutex::new(file));
    // SAFETY: descriptors 3, 4 and 5 are open (checked above), were handed to this process by
    // the shim for exactly this use, and nothing else in the process owns them.
    let (stdout, stderr, ready) = unsafe {
        (
            File::from_raw_fd(3),
            File::from_raw_fd(4),
            File::from_raw_fd(5),
        )
    };
    drop(ready);
    let err_out = out.clone();
    let errors = std::thread::spawn(move || copy(stderr, "stderr", &err_out));
    let r = copy(stdout, "stdout", &out);
    let e = errors
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the stderr copier panicked")));
    r.and(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let t = Utc::now();
        let line = format(t, "stderr", false, b"hello world");
        let r = parse(&line[..line.len() - 1]).unwrap();
        assert_eq!(r.stream, "stderr");
        assert!(!r.partial);
        assert_eq!(r.content, b"hello world");
        assert_eq!(r.time, t);
        let p = format(t, "stdout", true, b"");
        assert!(parse(&p[..p.len() - 1]).unwrap().partial);
        assert!(parse(b"plain text").is_none());
    }

    #[test]
    fn uris_carry_the_log_path() {
        let uri = binary_uri(
            Path::new("/usr/bin/skiff-node"),
            Path::new("/var/l og/0.log"),
        );
        assert_eq!(
            uri,
            "binary:///usr/bin/skiff-node?container-log=/var/l%20og/0.log"
        );
    }
}
