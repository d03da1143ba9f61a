//! Container logs as `kubectl logs` wants them, read from the files the runtime writes in
//! the CRI log format (`<RFC 3339 time> <stdout|stderr> <F|P> <text>`, P for a line the
//! runtime split): tail, since, timestamps, byte limits, and following a running container.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

/// `kubectl logs` options (the pods/log query parameters).
#[derive(Clone, Debug, Default)]
pub struct LogOptions {
    pub follow: bool,
    pub previous: bool,
    pub tail_lines: Option<usize>,
    pub since: Option<jiff::Timestamp>,
    pub timestamps: bool,
    pub limit_bytes: Option<usize>,
}

impl LogOptions {
    /// From the query string of `/containerLogs/...` (upstream's parameter names).
    pub fn from_query(query: &str) -> Result<Self, String> {
        let mut o = LogOptions::default();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            let flag = v == "true" || v == "1";
            match k.as_ref() {
                "follow" => o.follow = flag,
                "previous" => o.previous = flag,
                "timestamps" => o.timestamps = flag,
                "tailLines" => o.tail_lines = Some(v.parse().map_err(|_| format!("tailLines: invalid value {v:?}"))?),
                "limitBytes" => {
                    o.limit_bytes = Some(v.parse().map_err(|_| format!("limitBytes: invalid value {v:?}"))?)
                }
                "sinceSeconds" => {
                    let s: i64 = v.parse().map_err(|_| format!("sinceSeconds: invalid value {v:?}"))?;
                    o.since = jiff::Timestamp::now().checked_sub(jiff::SignedDuration::from_secs(s)).ok();
                }
                "sinceTime" => o.since = Some(v.parse().map_err(|_| format!("sinceTime: invalid value {v:?}"))?),
                _ => {}
            }
        }
        Ok(o)
    }
}

/// One parsed line of a CRI log file.
struct Entry<'a> {
    time: &'a str,
    partial: bool,
    text: &'a str,
}

fn parse(line: &str) -> Option<Entry<'_>> {
    let mut parts = line.splitn(4, ' ');
    let time = parts.next()?;
    let _stream = parts.next()?;
    let tag = parts.next()?;
    Some(Entry { time, partial: tag.starts_with('P'), text: parts.next().unwrap_or_default() })
}

/// Renders complete log lines (each ending in '\n') for the client; partial runtime
/// lines are joined with what follows them.
fn render(lines: &[&str], opts: &LogOptions, carry: &mut String) -> String {
    let mut out = String::new();
    for line in lines {
        let Some(e) = parse(line) else { continue };
        if let Some(since) = opts.since {
            if e.time.parse::<jiff::Timestamp>().is_ok_and(|t| t < since) {
                continue;
            }
        }
        if carry.is_empty() && opts.timestamps {
            carry.push_str(e.time);
            carry.push(' ');
        }
        carry.push_str(e.text);
        if !e.partial {
            out.push_str(carry);
            out.push('\n');
            carry.clear();
        }
    }
    out
}

/// The last `lines` lines of the log at `path`, at most its last `bytes` bytes (a failed
/// container's termination message under `FallbackToLogsOnError`).
pub fn last_lines(path: &std::path::Path, lines: usize, bytes: usize) -> String {
    // Enough of the file's end for `lines` lines of `bytes` in all, with their prefixes.
    let Ok(mut file) = std::fs::File::open(path) else { return String::new() };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let window = (bytes as u64 * 4 + 4096).min(len);
    let mut raw = String::new();
    if file.seek(SeekFrom::Start(len - window)).is_err() || file.read_to_string(&mut raw).is_err() {
        return String::new();
    }
    // The first line may be cut by the window: skip it unless the window is the file.
    let all: Vec<&str> = raw.lines().skip(usize::from(window < len)).collect();
    // A last line the container left unfinished (`echo -n`) counts too.
    let mut carry = String::new();
    let mut text = render(&all, &LogOptions::default(), &mut carry);
    text.push_str(&carry);
    let kept: Vec<&str> = text.lines().collect();
    let tail = kept[kept.len().saturating_sub(lines)..].join("\n");
    let start = tail.len().saturating_sub(bytes);
    let start = (start..=tail.len()).find(|i| tail.is_char_boundary(*i)).unwrap_or(tail.len());
    tail[start..].to_string()
}

/// Streams the log at `path` into `tx`: the existing content (after tail/since), then,
/// when following, new lines until `running()` says the container stopped.
pub async fn stream<F, Fut>(path: PathBuf, opts: LogOptions, tx: mpsc::Sender<Bytes>, running: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let Ok(mut file) = std::fs::File::open(&path) else { return };
    let mut text = String::new();
    if file.read_to_string(&mut text).is_err() {
        return;
    }
    let mut budget = opts.limit_bytes.unwrap_or(usize::MAX);
    let send = |s: String, budget: &mut usize| -> Option<Bytes> {
        if *budget == 0 || s.is_empty() {
            return None;
        }
        let cut = s.len().min(*budget);
        *budget -= cut;
        Some(Bytes::from(s.into_bytes()).slice(..cut))
    };
    // Whole lines only; a trailing fragment is read again with what follows it.
    let complete = text.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let mut offset = complete as u64;
    let mut lines: Vec<&str> = text[..complete].lines().collect();
    if let Some(n) = opts.tail_lines {
        lines = lines.split_off(lines.len().saturating_sub(n));
    }
    let mut carry = String::new();
    let mut first = render(&lines, &opts, &mut carry);
    if !opts.follow {
        // A last line the container left unfinished (`echo -n`, output without a final
        // newline) is part of its log, as upstream's kubelet writes it.
        first.push_str(&std::mem::take(&mut carry));
    }
    if let Some(b) = send(first, &mut budget) {
        if tx.send(b).await.is_err() {
            return;
        }
    }
    if !opts.follow {
        return;
    }
    let mut idle = 0u32;
    loop {
        if budget == 0 {
            return;
        }
        let mut more = String::new();
        if file.seek(SeekFrom::Start(offset)).is_err() || file.read_to_string(&mut more).is_err() {
            return;
        }
        let complete = more.rfind('\n').map(|i| i + 1).unwrap_or(0);
        if complete > 0 {
            idle = 0;
            offset += complete as u64;
            let lines: Vec<&str> = more[..complete].lines().collect();
            if let Some(b) = send(render(&lines, &opts, &mut carry), &mut budget) {
                if tx.send(b).await.is_err() {
                    return;
                }
            }
            continue;
        }
        if tx.is_closed() {
            return;
        }
        // Every second of quiet, ask whether the container still runs; when it has
        // stopped, what it left unfinished ends the stream.
        idle += 1;
        if idle.is_multiple_of(5) && !running().await {
            if let Some(b) = send(std::mem::take(&mut carry), &mut budget) {
                let _ = tx.send(b).await;
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_logs_end_is_its_last_lines_within_a_byte_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let mut log: String = (0..100).map(|i| format!("2026-11-23T10:00:00Z stdout F line {i}\n")).collect();
        log.push_str("2026-11-23T10:00:01Z stderr P DONE\n");
        std::fs::write(&path, log).unwrap();
        let tail = last_lines(&path, 3, 2048);
        assert_eq!(tail, "line 98\nline 99\nDONE");
        assert_eq!(last_lines(&path, 80, 10), "ne 99\nDONE", "at most the last bytes");
        assert_eq!(last_lines(&dir.path().join("none"), 80, 2048), "");
    }

    #[test]
    fn partial_lines_join_and_timestamps_prefix_whole_lines() {
        let lines = [
            "2026-11-23T10:00:00.000000001Z stdout P hel",
            "2026-11-23T10:00:00.000000002Z stdout F lo",
            "2026-11-23T10:00:01Z stderr F bye",
        ];
        let mut carry = String::new();
        assert_eq!(render(&lines, &LogOptions::default(), &mut carry), "hello\nbye\n");
        let opts = LogOptions { timestamps: true, ..Default::default() };
        assert_eq!(render(&lines[2..], &opts, &mut carry), "2026-11-23T10:00:01Z bye\n");
        let since = LogOptions { since: Some("2026-11-23T10:00:00.5Z".parse().unwrap()), ..Default::default() };
        assert_eq!(render(&lines, &since, &mut carry), "bye\n");
    }

    #[test]
    fn query_parameters() {
        let o = LogOptions::from_query("follow=true&tailLines=3&timestamps=1&limitBytes=10").unwrap();
        assert!(o.follow && o.timestamps && !o.previous);
        assert_eq!((o.tail_lines, o.limit_bytes), (Some(3), Some(10)));
        assert!(LogOptions::from_query("tailLines=x").is_err());
    }

    #[tokio::test]
    async fn tail_and_limit_apply_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        std::fs::write(&path, "2026-11-23T10:00:00Z stdout F one\n2026-11-23T10:00:01Z stdout F two\n2026-11-23T10:00:02Z stdout F three\n").unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        stream(path.clone(), LogOptions { tail_lines: Some(2), ..Default::default() }, tx, || async { false }).await;
        assert_eq!(rx.recv().await.unwrap(), Bytes::from("two\nthree\n"));
        let (tx, mut rx) = mpsc::channel(8);
        stream(path, LogOptions { limit_bytes: Some(5), ..Default::default() }, tx, || async { false }).await;
        assert_eq!(rx.recv().await.unwrap(), Bytes::from("one\nt"));
    }

    #[tokio::test]
    async fn output_without_a_final_newline_is_in_the_log() {
        // `cat` of files without newlines: the runtime writes the output as a partial
        // ("P") entry, and nothing completes it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        std::fs::write(&path, "2026-11-23T10:00:00Z stdout F first\n2026-11-23T10:00:01Z stdout P podsecret\n")
            .unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        stream(path.clone(), LogOptions::default(), tx, || async { false }).await;
        assert_eq!(rx.recv().await.unwrap(), Bytes::from("first\npodsecret"));
        // Following a container that has stopped ends with it too.
        let (tx, mut rx) = mpsc::channel(8);
        stream(path, LogOptions { follow: true, ..Default::default() }, tx, || async { false }).await;
        let mut all = Vec::new();
        while let Some(b) = rx.recv().await {
            all.extend_from_slice(&b);
        }
        assert_eq!(all, b"first\npodsecret");
    }
}
