//! `cargo xtask demo`: the main job on an embedded default (local file storage, no cluster).

use std::{io::Write, time::Duration};

use anyhow::{Context, bail};
use reqwest::blocking::Client;

use crate::util::{self, Server};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the demo keeps its key and streams (relative to the workspace root).
    #[arg(long, default_value = "data/demo")]
    pub dir: String,
}

const CONTEXT: &str = "workflows/demo/runs/1/steps/hello";

pub fn run(args: Args) -> anyhow::Result<()> {
    let Args { dir } = args;
    let dir = util::root().join(dir);
    std::fs::create_dir_all(&dir)?;
    let bin = util::build_metadata_api()?;
    let key = dir.join("metadata-api.key");
    let storage = format!("file://{}", dir.join("streams").display());
    let server = Server::start(
        &bin,
        &[
            "--listen",
            "127.0.0.1:0",
            "--storage",
            &storage,
            "--key-file",
            &key.to_string_lossy(),
        ],
    )?;
    let url = &server.url;
    let write = util::token(&bin, &key, CONTEXT, "write")?;
    let read = util::token(&bin, &key, "workflows/demo", "read")?;
    let http = Client::builder().timeout(Duration::from_secs(30)).build()?;

    println!("1. metadata API on {url}, storage {storage}");
    let created: serde_json::Value = http
        .post(format!("{url}/logs"))
        .bearer_auth(&write)
        .json(&serde_json::json!({"name": "stdout"}))
        .send()?
        .error_for_status()?
        .json()?;
    let id = created["id"].as_str().context("no id")?.to_owned();
    let start = created["length"].as_u64().unwrap_or(0);
    println!("2. stream {id} (stdout of {CONTEXT}), {start} bytes stored before");

    // Two parts, sent out of order, the second gzip-compressed, as a writer with parts in flight would.
    let first = format!("hello from the relay demo, run at offset {start}\n");
    let second = "this line travelled gzip-compressed and arrived first\n";
    let off2 = start + first.len() as u64;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(second.as_bytes())?;
    let patch = |offset: u64, body: Vec<u8>, len: usize, gzip: bool| -> anyhow::Result<()> {
        let mut req = http
            .patch(format!("{url}/logs/{id}/data"))
            .bearer_auth(&write)
            .header("content-type", "application/octet-stream")
            .header(
                "content-range",
                format!("bytes {offset}-{}/*", offset + len as u64 - 1),
            )
            .body(body);
        if gzip {
            req = req.header("content-encoding", "gzip");
        }
        let resp = req.send()?;
        if resp.status().as_u16() != 202 {
            bail!("PATCH answered {}: {}", resp.status(), resp.text()?);
        }
        Ok(())
    };
    patch(off2, gz.finish()?, second.len(), true)?;
    patch(start, first.clone().into_bytes(), first.len(), false)?;
    println!("3. appended two parts out of order (one gzip), both 202");

    let status: serde_json::Value = http
        .get(format!("{url}/logs/{id}"))
        .bearer_auth(&read)
        .send()?
        .error_for_status()?
        .json()?;
    println!("4. status: {status}");
    let text = http
        .get(format!("{url}/api/{CONTEXT}/logs"))
        .bearer_auth(&read)
        .send()?
        .error_for_status()?
        .text()?;
    println!("5. read back through the consumer API (GET /api/{CONTEXT}/logs):\n");
    for line in text.lines() {
        println!("   | {line}");
    }
    if !text.ends_with(second) {
        bail!("read-back does not end with what was written");
    }
    println!(
        "\nThe streams are under {}. Run it again and the stream continues where it ended.",
        dir.join("streams").display()
    );
    println!(
        "Follow it yourself:\n  target/release/metadata-api serve --storage {storage} --key-file {} &\n  \
         curl -N -H \"Authorization: Bearer $(target/release/metadata-api token --key-file {} --context workflows/demo --scope read)\" \\\n    \
         'http://127.0.0.1:7070/api/{CONTEXT}/logs?follow=true'",
        key.display(),
        key.display()
    );
    drop(server);
    Ok(())
}
