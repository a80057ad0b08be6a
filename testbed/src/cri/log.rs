//! The CRI container log format, read back into the bytes a container wrote.
//!
//! The runtime writes one line per line of output: `<RFC 3339 time> <stream> <tags> <text>\n`,
//! where the stream is `stdout` or `stderr` and the tags are `F` (the text ended with a newline,
//! which the log line does not repeat) or `P` (partial: the text continues in the stream's next
//! line; the runtime splits lines longer than its maximum, 16 KiB by default for containerd,
//! and writes `P` for output that ended without a newline). Tags may carry more, separated by
//! `:`; the first one decides.

use anyhow::{Context, bail};

/// What a container wrote to stdout and stderr, as read back from its CRI log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Logs {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Logs {
    /// stdout as text (invalid UTF-8 replaced).
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// stderr as text (invalid UTF-8 replaced).
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Parses a CRI log file back into stdout and stderr.
///
/// Text after the last newline is ignored: it is a line the runtime is still writing (the runtime
/// writes each line whole, so a finished log ends with a newline). A line that does not have the
/// format above is an error naming its line number.
pub fn parse(log: &[u8]) -> anyhow::Result<Logs> {
    let mut logs = Logs::default();
    let complete = match log.iter().rposition(|&b| b == b'\n') {
        Some(end) => &log[..end],
        None => return Ok(logs),
    };
    for (number, line) in complete.split(|&b| b == b'\n').enumerate() {
        parse_line(line, &mut logs).with_context(|| {
            let shown = String::from_utf8_lossy(&line[..line.len().min(120)]).into_owned();
            format!("CRI log line {}: {shown:?}", number + 1)
        })?;
    }
    Ok(logs)
}

fn parse_line(line: &[u8], logs: &mut Logs) -> anyhow::Result<()> {
    let mut fields = line.splitn(4, |&b| b == b' ');
    let (Some(time), Some(stream), Some(tags), Some(text)) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        bail!("expected `<time> <stream> <tags> <text>`");
    };
    if time.is_empty() || !time.first().is_some_and(u8::is_ascii_digit) {
        bail!("no timestamp");
    }
    let out = match stream {
        b"stdout" => &mut logs.stdout,
        b"stderr" => &mut logs.stderr,
        _ => bail!("unknown stream"),
    };
    out.extend_from_slice(text);
    match tags.split(|&b| b == b':').next() {
        Some(b"F") => out.push(b'\n'),
        Some(b"P") => {}
        _ => bail!("unknown tag"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_and_partial_lines_per_stream() {
        let log = b"2024-01-02T03:04:05.000000001Z stdout F hello\n\
2024-01-02T03:04:05.000000002Z stderr P par\n\
2024-01-02T03:04:05.000000003Z stdout F \n\
2024-01-02T03:04:05.000000004Z stderr F tial  with  spaces\r\n\
2024-01-02T03:04:05.000000005Z stdout P no newline at the end\n";
        let logs = parse(log).unwrap();
        assert_eq!(logs.stdout, b"hello\n\nno newline at the end");
        assert_eq!(logs.stderr, b"partial  with  spaces\r\n");
    }

    #[test]
    fn an_unfinished_last_line_is_left_out() {
        let logs = parse(b"2024-01-02T03:04:05Z stdout F a\n2024-01-02T03:04:05Z std").unwrap();
        assert_eq!(logs.stdout, b"a\n");
        assert_eq!(parse(b"").unwrap(), Logs::default());
        assert_eq!(parse(b"2024").unwrap(), Logs::default());
    }

    #[test]
    fn extra_tags_are_allowed() {
        let logs = parse(b"2024-01-02T03:04:05Z stdout P:x a\n").unwrap();
        assert_eq!(logs.stdout, b"a");
    }

    #[test]
    fn malformed_lines_are_errors() {
        for bad in [
            &b"2024-01-02T03:04:05Z stdout F\n"[..],
            b"2024-01-02T03:04:05Z stdin F a\n",
            b"2024-01-02T03:04:05Z stdout X a\n",
            b" stdout F a\n",
            b"\n",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(format!("{err:#}").contains("line 1"), "{err:#}");
        }
    }
}
