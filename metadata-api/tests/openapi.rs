//! `openapi.json` describes exactly the routes the server answers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;

use common::Server;
use metadata_api::routes::ROUTES;
use reqwest::{Method, StatusCode};

#[tokio::test]
async fn openapi_document_matches_the_real_routes() {
    let doc: serde_json::Value = serde_json::from_str(include_str!("../openapi.json")).unwrap();
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.clone(), path.clone()))
        })
        .collect();
    let routed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(documented, routed);
    // Each documented route is answered by a handler, not the fallback or a 405.
    let s = Server::start(&[]);
    let http = reqwest::Client::new();
    for (method, path) in &routed {
        let concrete = path
            .replace("{id}", &"0".repeat(64))
            .replace(['{', '}'], "");
        let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let r = http
            .request(m, format!("{}{concrete}", s.url))
            .send()
            .await
            .unwrap();
        let status = r.status();
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        let body = r.text().await.unwrap();
        // The fallback answers 404 `not_found` without auth; handlers ask for a token first.
        let public = ["/healthz", "/readyz", "/metrics"].contains(&path.as_str());
        if public {
            assert_eq!(status, StatusCode::OK, "{method} {path}");
        } else {
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}: {body}");
        }
    }
}
