//! `kubectl relay logs`: the read API's parameters from the flags, and its body on stdout as it
//! arrives.
//!
//! `-c CONTAINER` has no parameter of its own in the API (`stream=` names one stream, a container
//! has two and more): the plugin filters. In text it asks for `prefix=true`, keeps the lines whose
//! `[container/stream]` prefix is the container's, and takes the prefix off again unless
//! `--prefix` was given; in NDJSON it keeps the records whose stream is the container's. The
//! API's `--tail` and `--limit-bytes` therefore count the lines and bytes of every stream, before
//! the filter.

use std::io::ErrorKind;

use tokio::io::AsyncWriteExt;

use crate::{
    Output,
    api::Relay,
    error::Error,
    target::{Context, Target, container_of},
};

const NDJSON: &str = "application/x-ndjson";
const TEXT: &str = "text/plain";

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// step/W/R/S, trigger/W/T or pod/NAME.
    pub target: Target,
    /// Follow: keep printing as bytes arrive (a step's follow ends once every stream is complete).
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only bytes written since: a duration before now (10m, 1h) or an RFC 3339 time (UTC).
    #[arg(long)]
    pub since: Option<String>,
    /// Only bytes written until: a duration before now or an RFC 3339 time (UTC).
    #[arg(long)]
    pub until: Option<String>,
    /// The last N lines.
    #[arg(long)]
    pub tail: Option<u64>,
    /// Start every line with the time it was written (RFC 3339, nanoseconds).
    #[arg(long)]
    pub timestamps: bool,
    /// Start every line with [container/stream].
    #[arg(long)]
    pub prefix: bool,
    /// Only the streams of this container (filtered by the plugin: --tail and --limit-bytes
    /// count every stream's lines and bytes).
    #[arg(short = 'c', long)]
    pub container: Option<String>,
    /// Only this capture path.
    #[arg(long, value_enum)]
    pub source: Option<Source>,
    /// Stop after N bytes of output.
    #[arg(long)]
    pub limit_bytes: Option<u64>,
    /// A trigger's replica: only the logs of this pod (a pod/NAME target of a trigger pod sets it).
    #[arg(long)]
    pub pod: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    Entrypoint,
    Ebpf,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Self::Entrypoint => "entrypoint",
            Self::Ebpf => "ebpf",
        }
    }
}

/// The read route's path and query for these flags.
pub fn request_path(context: &Context, args: &LogsArgs, output: Output) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    if args.follow {
        q.append_pair("follow", "true");
    }
    if let Some(v) = &args.since {
        q.append_pair("since", v);
    }
    if let Some(v) = &args.until {
        q.append_pair("until", v);
    }
    if let Some(n) = args.tail {
        q.append_pair("tail", &n.to_string());
    }
    if args.timestamps {
        q.append_pair("timestamps", "true");
    }
    // The container filter reads the prefix of each line.
    if args.prefix || (args.container.is_some() && output == Output::Text) {
        q.append_pair("prefix", "true");
    }
    if let Some(n) = args.limit_bytes {
        q.append_pair("limit_bytes", &n.to_string());
    }
    if let Some(s) = args.source {
        q.append_pair("source", s.as_str());
    }
    if let Some(pod) = args.pod.as_ref().or(context.pod.as_ref()) {
        q.append_pair("pod", pod);
    }
    let q = q.finish();
    if q.is_empty() {
        context.logs_path()
    } else {
        format!("{}?{q}", context.logs_path())
    }
}

pub async fn run(
    relay: &Relay,
    context: &Context,
    args: &LogsArgs,
    output: Output,
) -> Result<(), Error> {
    let accept = match output {
        Output::Json => NDJSON,
        Output::Text => TEXT,
    };
    let mut body = relay
        .get(&request_path(context, args, output), accept)
        .await?;
    let mut filter = args.container.as_ref().map(|c| Filter {
        container: c.clone(),
        default: context.last_segment().to_owned(),
        json: output == Output::Json,
        timestamps: args.timestamps,
        keep_prefix: args.prefix,
        partial: Vec::new(),
    });
    let mut out = tokio::io::stdout();
    while let Some(chunk) = body.chunk().await? {
        let kept = match &mut filter {
            Some(f) => f.push(&chunk),
            None => chunk.to_vec(),
        };
        if !write(&mut out, &kept).await? {
            return Ok(());
        }
    }
    if let Some(f) = &mut filter {
        let rest = f.finish();
        write(&mut out, &rest).await?;
    }
    Ok(())
}

/// Writes and flushes at once (a follower prints as bytes come); `false` once stdout is closed
/// (`| head`), which ends the command quietly.
async fn write(out: &mut tokio::io::Stdout, bytes: &[u8]) -> Result<bool, Error> {
    if bytes.is_empty() {
        return Ok(true);
    }
    let written = match out.write_all(bytes).await {
        Ok(()) => out.flush().await,
        Err(e) => Err(e),
    };
    match written {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(Error::Usage(format!("cannot write to stdout: {e}"))),
    }
}

/// Prints a whole answer; JSON gets a final newline.
pub async fn print(bytes: &[u8], json: bool) -> Result<(), Error> {
    let mut out = tokio::io::stdout();
    if write(&mut out, bytes).await? && json && !bytes.ends_with(b"\n") {
        write(&mut out, b"\n").await?;
    }
    Ok(())
}

/// `-c CONTAINER`: keeps the lines (or NDJSON records) of one container's streams.
#[derive(Debug)]
struct Filter {
    container: String,
    /// The step or trigger, which `stdout` without a container belongs to.
    default: String,
    json: bool,
    timestamps: bool,
    /// `--prefix` was given: the prefix stays.
    keep_prefix: bool,
    /// An unfinished line.
    partial: Vec<u8>,
}

impl Filter {
    /// The complete lines of `chunk` (with what came before) that are kept.
    fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        self.partial.extend_from_slice(chunk);
        let Some(last) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return Vec::new();
        };
        let rest = self.partial.split_off(last + 1);
        let lines = std::mem::replace(&mut self.partial, rest);
        let mut out = Vec::new();
        for line in lines.split_inclusive(|b| *b == b'\n') {
            self.line(line, &mut out);
        }
        out
    }

    /// What is left at the end of the body.
    fn finish(&mut self) -> Vec<u8> {
        let line = std::mem::take(&mut self.partial);
        let mut out = Vec::new();
        if !line.is_empty() {
            self.line(&line, &mut out);
        }
        out
    }

    fn line(&self, line: &[u8], out: &mut Vec<u8>) {
        if self.json {
            let stream = serde_json::from_slice::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["stream"].as_str().map(str::to_owned));
            if stream.is_some_and(|s| container_of(&s, &self.default) == self.container) {
                out.extend_from_slice(line);
            }
            return;
        }
        // `[TIME ][container/stream] text`.
        let (time, rest) = if self.timestamps {
            match line.iter().position(|b| *b == b' ') {
                Some(sp) => line.split_at(sp + 1),
                None => return,
            }
        } else {
            (&line[..0], line)
        };
        let Some(end) = rest.windows(2).position(|w| w == b"] ") else {
            return;
        };
        let label = &rest[..end];
        let Some(label) = label.strip_prefix(b"[") else {
            return;
        };
        let container = match label.iter().rposition(|b| *b == b'/') {
            Some(slash) => &label[..slash],
            None => return,
        };
        if container != self.container.as_bytes() {
            return;
        }
        out.extend_from_slice(time);
        if self.keep_prefix {
            out.extend_from_slice(rest);
        } else {
            out.extend_from_slice(&rest[end + 2..]);
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        logs: LogsArgs,
    }

    fn path(argv: &[&str], output: Output) -> String {
        let mut all = vec!["logs"];
        all.extend_from_slice(argv);
        let cli = Cli::try_parse_from(all).unwrap();
        let context = match &cli.logs.target {
            Target::Pod(name) => Context {
                path: "workflows/w/triggers/t".into(),
                pod: Some(name.clone()),
            },
            t => Context::of(t).unwrap(),
        };
        request_path(&context, &cli.logs, output)
    }

    #[test]
    fn flags_become_the_read_parameters() {
        assert_eq!(
            path(&["step/w/1/s"], Output::Text),
            "/api/workflows/w/runs/1/steps/s/logs"
        );
        assert_eq!(
            path(
                &[
                    "step/w/1/s",
                    "-f",
                    "--since",
                    "10m",
                    "--until",
                    "2026-12-07T10:00:00Z",
                    "--tail",
                    "100",
                    "--timestamps",
                    "--prefix",
                    "--limit-bytes",
                    "5",
                    "--source",
                    "ebpf",
                ],
                Output::Text
            ),
            "/api/workflows/w/runs/1/steps/s/logs?follow=true&since=10m&until=2026-12-07T10%3A00%3A00Z\
             &tail=100&timestamps=true&prefix=true&limit_bytes=5&source=ebpf"
        );
        assert_eq!(
            path(&["trigger/w/t", "--pod", "p-1"], Output::Json),
            "/api/workflows/w/triggers/t/logs?pod=p-1"
        );
        assert_eq!(
            path(&["pod/p-2"], Output::Text),
            "/api/workflows/w/triggers/t/logs?pod=p-2"
        );
        // The container filter reads prefixes in text, records in JSON.
        assert_eq!(
            path(&["step/w/1/s", "-c", "app"], Output::Text),
            "/api/workflows/w/runs/1/steps/s/logs?prefix=true"
        );
        assert_eq!(
            path(&["step/w/1/s", "-c", "app"], Output::Json),
            "/api/workflows/w/runs/1/steps/s/logs"
        );
    }

    fn filter(container: &str, json: bool, timestamps: bool, keep_prefix: bool) -> Filter {
        Filter {
            container: container.into(),
            default: "s".into(),
            json,
            timestamps,
            keep_prefix,
            partial: Vec::new(),
        }
    }

    #[test]
    fn the_container_filter_keeps_its_lines_across_chunks() {
        let text = "[app/stdout] one\n[side/stdout] two\n[app/stderr] three\n[s/stdout] four\n\
                    [app/stdout] [relay: 3 bytes dropped]\n[app/stdout] no newline";
        for cut in 0..text.len() {
            let mut f = filter("app", false, false, false);
            let mut out = f.push(&text.as_bytes()[..cut]);
            out.extend(f.push(&text.as_bytes()[cut..]));
            out.extend(f.finish());
            assert_eq!(
                String::from_utf8(out).unwrap(),
                "one\nthree\n[relay: 3 bytes dropped]\nno newline",
                "cut at {cut}"
            );
        }
        let mut f = filter("s", false, true, true);
        let out = f.push(b"2026-12-07T10:00:00.000000000Z [s/stdout] four\nT [app/stdout] x\n");
        assert_eq!(out, b"2026-12-07T10:00:00.000000000Z [s/stdout] four\n");
        let mut f = filter("s", false, true, false);
        let out = f.push(b"2026-12-07T10:00:00.000000000Z [s/stdout] four\n");
        assert_eq!(out, b"2026-12-07T10:00:00.000000000Z four\n");
    }

    #[test]
    fn the_container_filter_keeps_its_records() {
        let mut f = filter("app", true, false, false);
        let out = f.push(
            br#"{"kind":"data","stream":"app.stdout","data":"a\n"}
{"kind":"data","stream":"stdout","data":"b\n"}
{"kind":"dropped","stream":"app.stderr.1","offset":0,"length":3}
"#,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"kind\":\"data\",\"stream\":\"app.stdout\",\"data\":\"a\\n\"}\n\
             {\"kind\":\"dropped\",\"stream\":\"app.stderr.1\",\"offset\":0,\"length\":3}\n"
        );
    }
}
