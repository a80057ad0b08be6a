//! The same stream life cycle on every storage backend: file (default), S3 (moto) and GCS
//! (gcp-storage-emulator), the emulators started here from the venv `cargo xtask test` installs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::{CTX, Emulator, Server, bytes, sha256};
use metadata_api::auth::Scope;

async fn life_cycle(s: &Server) {
    let w = s.client(&s.token(CTX, Scope::Write));
    let id = w.stream("stdout").await;
    let data = bytes(5, 300_000);
    // Out of order, a re-send and a conflict, a dropped range, a final length.
    w.put_at(&id, 100_000, &data[100_000..200_000]).await;
    w.put_at(&id, 0, &data[..100_000]).await;
    w.put_at(&id, 50_000, &data[50_000..150_000]).await;
    let r = w.patch(&id, "bytes 0-2/*", "xyz").await;
    assert_eq!(r.status(), reqwest::StatusCode::CONFLICT);
    let r = w.mark(&id, "bytes 200000-249999/*").await;
    assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);
    w.put_at(&id, 250_000, &data[250_000..]).await;
    w.finish(&id, 300_000).await;
    let st = w.status(&id).await;
    assert_eq!(st["complete"], true, "{st}");
    let mut want = data[..200_000].to_vec();
    want.extend_from_slice(&data[250_000..]);
    assert_eq!(sha256(&w.data(&id).await), sha256(&want));
    // A second process on the same storage sees the same stream under the same id.
    let again = Server::start_with_env(&s.dir, &s.storage, &[], &s.env);
    let w2 = again.client(&again.token(CTX, Scope::Write));
    assert_eq!(w2.stream("stdout").await, id);
    assert_eq!(sha256(&w2.data(&id).await), sha256(&want));
    // The capture report finds a context's streams through the index on this backend too, in
    // a process that did not create them.
    let app = w.stream("app.stdout").await;
    w.put_at(&app, 0, b"hi\n").await;
    let r = w2
        .json("/api/workflows/w1/runs/r1/steps/s1/logs/capture-report")
        .await;
    let names: Vec<&str> = r["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["app.stdout", "stdout"], "{r:#}");
    assert_eq!(r["streams"][1]["entrypoint"]["sha256"], sha256(&want));
    assert_eq!(r["streams"][1]["comparison"], "entrypoint_only");
}

#[tokio::test]
async fn file_backend() {
    life_cycle(&Server::start(&[])).await;
}

/// Retention settings short enough for a test: contexts idle for 3 s go, checked every second.
const RETENTION: [&str; 4] = ["--retention", "3s", "--retention-every", "1s"];

/// A step that stopped writing is deleted whole by retention, index entry included; a trigger
/// that keeps writing beside it keeps all of its bytes.
async fn retention_cycle(s: &Server) {
    let step = s.client(&s.token(CTX, Scope::Write));
    let out = step.stream("stdout").await;
    let err = step.stream("stderr").await;
    step.put_at(&out, 0, b"built\n").await;
    step.put_at(&err, 0, b"warning\n").await;
    let trigger = s.client(&s.token("workflows/w1/triggers/t1", Scope::Write));
    let hook = trigger.stream("stdout").await;
    let mut written = Vec::new();
    let start = Instant::now();
    let gone = |id: String| {
        let step = step.clone();
        async move {
            step.req(reqwest::Method::GET, &format!("/logs/{id}"))
                .send()
                .await
                .unwrap()
                .status()
                == reqwest::StatusCode::NOT_FOUND
        }
    };
    loop {
        let line = format!("request {}\n", written.len() / 12);
        let line = format!("{line:>12}");
        trigger
            .put_at(&hook, written.len() as u64, line.as_bytes())
            .await;
        written.extend_from_slice(line.as_bytes());
        if gone(out.clone()).await && gone(err.clone()).await {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "the idle step was not deleted"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // S3 keeps modification times to the second (truncated): 3 s of age may be 2 s of time.
    assert!(
        start.elapsed() >= Duration::from_secs(2),
        "deleted too early"
    );
    assert_eq!(trigger.data(&hook).await, written);
    // The capture report no longer finds the step's streams through the index.
    let r = s
        .client(&s.token("workflows/w1", Scope::Read))
        .json("/api/workflows/w1/runs/r1/steps/s1/logs/capture-report")
        .await;
    assert_eq!(r["streams"], serde_json::json!([]), "{r:#}");
}

/// `DELETE` of a run: only a delete token of the run or above it may; every stream of the run goes,
/// index entries included, and nothing else; asking again deletes nothing and succeeds.
async fn delete_cycle(s: &Server) {
    let mut ids = Vec::new();
    for ctx in [
        "workflows/w1/runs/r1/steps/build",
        "workflows/w1/runs/r1/steps/test",
        "workflows/w1/runs/r2/steps/build",
        "workflows/w1-b/runs/r1/steps/build",
        "workflows/w1/triggers/t1",
    ] {
        let w = s.client(&s.token(ctx, Scope::Write));
        for name in ["stdout", "stderr"] {
            let id = w.stream(name).await;
            let line = format!("{ctx} {name}\n");
            w.put_at(&id, 0, line.as_bytes()).await;
            ids.push((ctx, w.clone(), id, line));
        }
    }
    let delete = |token: Option<String>, path: &'static str| {
        let api = match &token {
            Some(t) => s.client(t),
            None => s.client(""),
        };
        async move {
            let r = api.req(reqwest::Method::DELETE, path).send().await.unwrap();
            let status = r.status();
            (status, r.text().await.unwrap())
        }
    };
    let run = "/api/workflows/w1/runs/r1";
    for (token, why) in [
        (None, "no token"),
        (Some(s.token("workflows/w1", Scope::Read)), "a read token"),
        (
            Some(s.token("workflows/w1/runs/r1/steps/build", Scope::Write)),
            "a write token",
        ),
        (
            Some(s.token("workflows", Scope::Collector)),
            "a collector token",
        ),
        (
            Some(s.token("workflows/w1/runs/r2", Scope::Delete)),
            "another run's",
        ),
        (
            Some(s.token("workflows/w1-b", Scope::Delete)),
            "a workflow sharing a prefix",
        ),
    ] {
        let (status, body) = delete(token, run).await;
        assert!(
            matches!(status.as_u16(), 401 | 403),
            "{why}: {status} {body}"
        );
    }
    // Refused: everything is still there.
    for (_, w, id, line) in &ids {
        assert_eq!(w.data(id).await, line.as_bytes());
    }
    let token = Some(s.token("workflows/w1", Scope::Delete));
    let (status, body) = delete(token.clone(), run).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    let done: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(done["streams"], 4, "{done}");
    for (ctx, w, id, _) in &ids {
        let status = w
            .req(reqwest::Method::GET, &format!("/logs/{id}"))
            .send()
            .await
            .unwrap()
            .status();
        let gone = ctx.starts_with("workflows/w1/runs/r1/");
        assert_eq!(
            status == reqwest::StatusCode::NOT_FOUND,
            gone,
            "{ctx} {id}: {status}"
        );
    }
    let r = s
        .client(&s.token("workflows/w1", Scope::Read))
        .json("/api/workflows/w1/runs/r1/steps/build/logs/capture-report")
        .await;
    assert_eq!(r["streams"], serde_json::json!([]), "{r:#}");
    let (status, body) = delete(token, run).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    let again: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (again["streams"].as_u64(), again["objects"].as_u64()),
        (Some(0), Some(0))
    );
}

#[tokio::test]
async fn file_backend_delete() {
    delete_cycle(&Server::start(&[])).await;
}

#[tokio::test]
async fn s3_backend_delete_on_moto() {
    let Some((_moto, _tmp, s)) = on_moto("deleted").await else {
        return;
    };
    delete_cycle(&s).await;
}

#[tokio::test]
async fn file_backend_retention() {
    retention_cycle(&Server::start(&RETENTION)).await;
}

#[tokio::test]
async fn s3_backend_retention_on_moto() {
    let Some((_moto, _tmp, s)) = on_moto_with("retained", &RETENTION).await else {
        return;
    };
    retention_cycle(&s).await;
}

#[tokio::test]
async fn s3_backend_on_moto() {
    let Some((_moto, _tmp, s)) = on_moto("tenant-logs").await else {
        return;
    };
    life_cycle(&s).await;
}

/// The moto S3 emulator with a bucket, and a server storing under `prefix` in it (`None` when
/// the emulator is not installed). The directory holds the server's key: keep it with the server.
async fn on_moto(prefix: &str) -> Option<(Emulator, tempfile::TempDir, Server)> {
    on_moto_with(prefix, &[]).await
}

/// [`on_moto`] with extra server arguments.
async fn on_moto_with(
    prefix: &str,
    extra: &[&str],
) -> Option<(Emulator, tempfile::TempDir, Server)> {
    let moto = Emulator::moto()?;
    let endpoint = moto.endpoint();
    let r = reqwest::Client::new()
        .put(format!("{endpoint}/relay-logs"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "create bucket: {}", r.status());
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_with_env(
        tmp.path(),
        &format!("s3://relay-logs/{prefix}"),
        extra,
        &moto.s3_env(),
    );
    Some((moto, tmp, s))
}

/// Sends `sig` (`STOP`, `CONT`) to the emulator.
fn signal(emulator: &Emulator, sig: &str) {
    let status = Command::new("kill")
        .args([format!("-{sig}"), emulator.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{sig}");
}

/// Resumes a stopped emulator however the test ends, so it can be killed.
struct Resume<'a>(&'a Emulator);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

/// A writer gives up on a request while the S3 emulator is stopped (as the shipping client does
/// on its timeout) and sends the same range again once storage is back: it is stored at once.
/// The API drops the handler of a request whose client went away, with its write midway; the
/// range that write had reserved in the stream was never released, so every re-send of it waited
/// for it forever and the stream stored nothing more once storage was back (the `storage-down`
/// fault scenario, `cargo bench -p system-tests --bench faults -- --scenario storage-down`).
#[tokio::test]
async fn s3_a_write_given_up_while_storage_is_stopped_does_not_block_its_range() {
    let Some((moto, _tmp, s)) = on_moto("stalled").await else {
        return;
    };
    let w = s.client(&s.token(CTX, Scope::Write));
    let id = w.stream("stdout").await;
    let data = bytes(11, 300_000);
    w.put_at(&id, 0, &data[..100_000]).await;
    let impatient = common::Api {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap(),
        ..w.clone()
    };
    let range = "bytes 100000-199999/*";
    let send = |c: &common::Api| {
        c.req(reqwest::Method::PATCH, &format!("/logs/{id}/data"))
            .header("content-type", "application/octet-stream")
            .header("content-range", range)
            .body(data[100_000..200_000].to_vec())
            .send()
    };
    {
        signal(&moto, "STOP");
        let _resume = Resume(&moto);
        // The API's storage call (20 s timeout) cannot answer before the client gives up.
        let r = send(&impatient).await;
        assert!(
            r.as_ref().is_err_and(reqwest::Error::is_timeout),
            "the API answered while storage was stopped: {r:?}"
        );
    }
    let resumed = Instant::now();
    let deadline = resumed + Duration::from_secs(20);
    let mut answers = Vec::new();
    loop {
        match send(&impatient).await {
            Ok(r) if r.status() == reqwest::StatusCode::ACCEPTED => break,
            Ok(r) => answers.push(r.status().to_string()),
            Err(e) if e.is_timeout() => answers.push("no answer in 2 s".to_owned()),
            Err(e) => answers.push(e.to_string()),
        }
        assert!(
            Instant::now() < deadline,
            "the re-sent range was not stored in 20 s after storage came back: {answers:?}"
        );
    }
    eprintln!(
        "re-sent range stored {:.2} s after storage came back ({} attempts before)",
        resumed.elapsed().as_secs_f64(),
        answers.len()
    );
    w.put_at(&id, 200_000, &data[200_000..]).await;
    w.finish(&id, 300_000).await;
    let st = w.status(&id).await;
    assert_eq!(st["complete"], true, "{st}");
    assert_eq!(st["dropped"], serde_json::json!([]), "{st}");
    assert_eq!(sha256(&w.data(&id).await), sha256(&data));
}

#[tokio::test]
async fn gcs_backend_on_gcp_storage_emulator_fails_cleanly() {
    let Some(gcs) = Emulator::gcs("relay-logs") else {
        return;
    };
    let key = serde_json::json!({
        "gcs_base_url": gcs.endpoint(),
        "disable_oauth": true,
        "client_email": "",
        "private_key": "",
        "private_key_id": "",
    })
    .to_string();
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_with_env(
        tmp.path(),
        "gs://relay-logs/tenant-logs",
        &[],
        &env(&[("GOOGLE_SERVICE_ACCOUNT_KEY", key.as_str())]),
    );
    // Known gap: every object the store writes is a conditional create, which object_store sends
    // as an XML API upload with `x-goog-if-generation-match: 0`; gcp-storage-emulator answers that
    // header with 501 (plain uploads work). When the emulator learns it, this test fails: replace
    // the assertions below by `life_cycle(&s).await`.
    // Until then the service must fail cleanly: 503, Retry-After, a JSON error, no panic.
    let w = s.client(&s.token(CTX, Scope::Write));
    let r = w.create(serde_json::json!({"name": "stdout"})).await;
    assert_eq!(r.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "unavailable");
}

fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}
