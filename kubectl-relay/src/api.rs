//! The metadata API, at a direct URL or through the Kubernetes API server's service proxy.

use bytes::Bytes;
use http::{HeaderValue, header};
use http_body_util::BodyExt as _;

use crate::{
    error::{Error, chain, one_line},
    kube::Kube,
};

/// The Service the API is reached through by default (`deploy/base/metadata-api.yaml`).
pub const DEFAULT_SERVICE: &str = "relay-system/metadata-api:http";

/// A Service as `--service` names it: `NAMESPACE/NAME[:PORT]` (a port's name or number).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub port: Option<String>,
}

impl std::str::FromStr for Service {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a Service: expected NAMESPACE/NAME[:PORT]");
        let (namespace, rest) = s.split_once('/').ok_or_else(bad)?;
        let (name, port) = match rest.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (rest, None),
        };
        let dns = |v: &str| {
            !v.is_empty()
                && v.len() <= 63
                && v.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        if !dns(namespace) || !dns(name) || port.is_some_and(|p| !dns(p)) {
            return Err(bad());
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            port: port.map(str::to_owned),
        })
    }
}

impl Service {
    /// The API server path that proxies to this Service: `path` (which starts with `/`) is
    /// appended to it.
    pub fn proxy_prefix(&self) -> String {
        let port = self
            .port
            .as_deref()
            .map_or(String::new(), |p| format!(":{p}"));
        format!(
            "/api/v1/namespaces/{}/services/{}{port}/proxy",
            self.namespace, self.name
        )
    }
}

/// Where requests go.
#[derive(Debug)]
enum Endpoint {
    /// The API's own URL (`--url`, `RELAY_URL`): the token in `Authorization`.
    Direct { base: String, http: reqwest::Client },
    /// The API server's service proxy: kube's client authenticates to the API server (which
    /// removes `Authorization` once it has), and the user's token travels in
    /// [`contract::headers::PROXIED_AUTHORIZATION`].
    Proxy {
        kube: Box<Kube>,
        prefix: String,
        service: String,
    },
}

/// The metadata API, with the token sent to it.
#[derive(Debug)]
pub struct Relay {
    endpoint: Endpoint,
    token: String,
}

/// A response body, read as it arrives.
pub enum Body {
    Direct(reqwest::Response),
    Proxy(kube::client::Body),
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Body")
    }
}

impl Body {
    /// The next piece of the body, `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, Error> {
        let broken = |e: String| Error::Unavailable(format!("the response broke off: {e}"));
        match self {
            Self::Direct(r) => r.chunk().await.map_err(|e| broken(chain(&e))),
            Self::Proxy(b) => loop {
                match b.frame().await {
                    None => return Ok(None),
                    Some(Err(e)) => return Err(broken(chain(&e))),
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            return Ok(Some(data));
                        }
                    }
                }
            },
        }
    }

    /// The whole body.
    pub async fn bytes(mut self) -> Result<Vec<u8>, Error> {
        let mut all = Vec::new();
        while let Some(c) = self.chunk().await? {
            all.extend_from_slice(&c);
        }
        Ok(all)
    }
}

impl Relay {
    pub fn direct(url: &str, token: String) -> Result<Self, Error> {
        let parsed = url::Url::parse(url)
            .map_err(|e| Error::Usage(format!("--url {url:?} is not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(Error::Usage(format!("--url {url:?} is not an http(s) URL")));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| Error::Usage(format!("cannot make an HTTP client: {}", chain(&e))))?;
        Ok(Self {
            endpoint: Endpoint::Direct {
                base: url.trim_end_matches('/').to_owned(),
                http,
            },
            token,
        })
    }

    pub fn proxied(kube: Kube, service: &Service, token: String) -> Self {
        Self {
            endpoint: Endpoint::Proxy {
                kube: Box::new(kube),
                prefix: service.proxy_prefix(),
                service: format!("{}/{}", service.namespace, service.name),
            },
            token,
        }
    }

    /// `GET path` (with its query), `accept` as the `Accept` header; the body once the status is
    /// a success, else the error its status and message say.
    pub async fn get(&self, path: &str, accept: &str) -> Result<Body, Error> {
        let bearer = HeaderValue::from_str(&format!("Bearer {}", self.token))
            .map_err(|_| Error::Usage("the token is not a valid header value".to_owned()))?;
        match &self.endpoint {
            Endpoint::Direct { base, http } => {
                let url = format!("{base}{path}");
                let resp = http
                    .get(&url)
                    .header(header::AUTHORIZATION, bearer)
                    .header(header::ACCEPT, accept)
                    .send()
                    .await
                    .map_err(|e| {
                        Error::Unavailable(format!(
                            "cannot reach the relay API at {base}: {}",
                            chain(&e)
                        ))
                    })?;
                let status = resp.status().as_u16();
                if resp.status().is_success() {
                    return Ok(Body::Direct(resp));
                }
                let text = resp.text().await.unwrap_or_default();
                Err(api_error(status, &text, &format!("GET {url}"), None))
            }
            Endpoint::Proxy {
                kube,
                prefix,
                service,
            } => {
                let uri = format!("{prefix}{path}");
                let mut req = http::Request::get(&uri)
                    .header(header::ACCEPT, accept)
                    .body(kube::client::Body::empty())
                    .map_err(|e| Error::Usage(format!("bad request {uri}: {e}")))?;
                req.headers_mut()
                    .insert(contract::headers::PROXIED_AUTHORIZATION, bearer);
                let resp = kube.client.send(req).await.map_err(|e| {
                    Error::Unavailable(format!(
                        "cannot reach the Kubernetes API server at {}: {}",
                        kube.config.cluster_url,
                        chain(&e)
                    ))
                })?;
                let status = resp.status().as_u16();
                let body = resp.into_body();
                if (200..300).contains(&status) {
                    return Ok(Body::Proxy(body));
                }
                let text = Body::Proxy(body).bytes().await.unwrap_or_default();
                let text = String::from_utf8_lossy(&text);
                Err(api_error(
                    status,
                    &text,
                    &format!("GET {path} through service {service}"),
                    Some(service),
                ))
            }
        }
    }
}

/// The error for a failed request: the relay API's `{"error", "message"}`, or, through the
/// proxy, the API server's own `Status` (a missing Service, no endpoints, RBAC).
fn api_error(status: u16, body: &str, what: &str, service: Option<&str>) -> Error {
    let json: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let message = json
        .as_ref()
        .and_then(|j| j["message"].as_str())
        .map(one_line)
        .unwrap_or_else(|| one_line(body));
    let from_apiserver = json.as_ref().is_some_and(|j| j["kind"] == "Status");
    if let (true, Some(service)) = (from_apiserver, service) {
        let text =
            format!("the Kubernetes API server answered {status} for service {service}: {message}");
        // A missing Service or one without endpoints: the relay API cannot be reached.
        return match status {
            401 | 403 => Error::Unauthorized(text),
            _ => Error::Unavailable(text),
        };
    }
    let text = if message.is_empty() {
        format!("{what}: {status}")
    } else {
        format!("{what}: {status}: {message}")
    };
    Error::from_status(status, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_parse_into_proxy_paths() {
        let s: Service = DEFAULT_SERVICE.parse().unwrap();
        assert_eq!(
            s.proxy_prefix(),
            "/api/v1/namespaces/relay-system/services/metadata-api:http/proxy"
        );
        let s: Service = "ns/api".parse().unwrap();
        assert_eq!(s.proxy_prefix(), "/api/v1/namespaces/ns/services/api/proxy");
        let s: Service = "ns/api:7070".parse().unwrap();
        assert_eq!(s.port.as_deref(), Some("7070"));
        for bad in ["api", "ns/", "/api", "ns/api:", "NS/api", "ns/a/b"] {
            assert!(bad.parse::<Service>().is_err(), "{bad}");
        }
    }

    #[test]
    fn statuses_map_to_kinds() {
        let relay = r#"{"error":"not_found","message":"not found"}"#;
        assert_eq!(api_error(404, relay, "GET x", None).code(), 2);
        assert_eq!(api_error(401, relay, "GET x", None).code(), 3);
        assert_eq!(api_error(400, relay, "GET x", None).code(), 5);
        assert_eq!(api_error(503, relay, "GET x", None).code(), 4);
        // Through the proxy the relay API's own 404 is a 404; the API server's is not.
        assert_eq!(api_error(404, relay, "GET x", Some("ns/api")).code(), 2);
        let apiserver = r#"{"kind":"Status","code":404,"message":"services \"api\" not found"}"#;
        let e = api_error(404, apiserver, "GET x", Some("ns/api"));
        assert_eq!(e.code(), 4, "{e}");
        assert!(e.to_string().contains("services \"api\" not found"));
        let forbidden = r#"{"kind":"Status","code":403,"message":"forbidden"}"#;
        assert_eq!(api_error(403, forbidden, "GET x", Some("ns/api")).code(), 3);
    }
}
