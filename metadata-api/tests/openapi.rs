//! `openapi.json` describes exactly the routes the server answers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;

use common::Server;
use metadata_api::{coding::Coding, routes::ROUTES};
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

#[test]
fn documented_drop_reasons_are_the_ones_the_server_knows() {
    let doc: serde_json::Value = serde_json::from_str(include_str!("../openapi.json")).unwrap();
    let documented: Vec<&str> = doc["components"]["schemas"]["DropReason"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let known: Vec<&str> = metadata_api::reason::DropReason::ALL
        .iter()
        .map(|r| r.as_str())
        .collect();
    assert_eq!(documented, known);
}

#[test]
fn documented_content_encodings_are_the_ones_the_server_decodes() {
    let doc: serde_json::Value = serde_json::from_str(include_str!("../openapi.json")).unwrap();
    let param = &doc["components"]["parameters"]["ContentEncoding"];
    assert_eq!(param["name"], "Content-Encoding");
    let listed: Vec<&str> = param["schema"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let decoded: Vec<&str> = Coding::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(listed, decoded);
    for method in ["post", "patch"] {
        let params = doc["paths"]["/logs/{id}/data"][method]["parameters"]
            .as_array()
            .unwrap();
        assert!(
            params
                .iter()
                .any(|p| p["$ref"] == "#/components/parameters/ContentEncoding"),
            "{method}"
        );
    }
}
