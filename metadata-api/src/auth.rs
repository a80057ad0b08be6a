//! Credentials: the server key, bearer tokens (JWT, HS256) and log contexts.

use std::{
    fmt,
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Audience every token carries, so tokens minted for other services do not work here.
pub const AUDIENCE: &str = "relay-metadata-api";
pub const ISSUER: &str = "relay-metadata-api";
/// Longest token accepted, before any parsing.
pub const MAX_TOKEN_LEN: usize = 4096;

/// What a token lets its bearer do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Create streams in exactly the token's context, append to them, read them.
    Write,
    /// Read every stream under the token's context prefix.
    Read,
    /// Create and append `ebpf` streams in any context named in the request.
    Collector,
    /// Delete every stream under the token's context prefix (a workflow, a run, a trigger); read
    /// and write nothing.
    Delete,
}

/// A log context: `workflows/{w}/triggers/{t}` or `workflows/{w}/runs/{r}/steps/{s}`, or for read
/// tokens any prefix of those made of whole segments (`workflows/W`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Context(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    #[error(
        "context must be `workflows/{{workflow}}/triggers/{{id}}` or `workflows/{{workflow}}/runs/{{run}}/steps/{{step}}`"
    )]
    Shape,
    #[error("context segment {0:?} must be 1-253 characters of [A-Za-z0-9._-] and not `.` or `..`")]
    Segment(String),
}

use crate::names::valid_context_segment as valid_segment;

impl Context {
    /// The workflow the context belongs to (its second segment): the tenant whose budget its
    /// streams share.
    pub fn workflow(&self) -> &str {
        self.0.split('/').nth(1).unwrap_or_default()
    }

    /// A full context a stream can live in.
    pub fn stream(s: &str) -> Result<Self, ContextError> {
        let ctx = Self::prefix(s)?;
        if !ctx.is_stream_context() {
            return Err(ContextError::Shape);
        }
        Ok(ctx)
    }

    /// A full context or a prefix of one (whole segments).
    pub fn prefix(s: &str) -> Result<Self, ContextError> {
        let segs: Vec<&str> = s.split('/').collect();
        if let Some(bad) = segs.iter().find(|s| !valid_segment(s)) {
            return Err(ContextError::Segment((*bad).to_owned()));
        }
        let keywords_ok = match segs.as_slice() {
            ["workflows", rest @ ..] => match rest {
                [] | [_] => true,
                [_, "triggers", ..] => rest.len() <= 3,
                [_, "runs", more @ ..] => match more {
                    [] | [_] => true,
                    [_, "steps", ..] => more.len() <= 3,
                    _ => false,
                },
                _ => false,
            },
            _ => false,
        };
        if !keywords_ok {
            return Err(ContextError::Shape);
        }
        Ok(Self(s.to_owned()))
    }

    fn is_stream_context(&self) -> bool {
        let segs: Vec<&str> = self.0.split('/').collect();
        matches!(
            segs.as_slice(),
            ["workflows", _, "triggers", _] | ["workflows", _, "runs", _, "steps", _]
        )
    }

    /// Whether this context is a trigger (always in progress, followed until the reader leaves).
    pub fn is_trigger(&self) -> bool {
        self.0.split('/').nth(2) == Some("triggers")
    }

    /// Whether `other` lies under this prefix (whole segments only).
    pub fn covers(&self, other: &Context) -> bool {
        other.0 == self.0
            || (other.0.starts_with(&self.0) && other.0.as_bytes().get(self.0.len()) == Some(&b'/'))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Context {
    type Error = ContextError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::prefix(&s)
    }
}

impl From<Context> for String {
    fn from(c: Context) -> Self {
        c.0
    }
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// JWT claims of a bearer token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The log context (or prefix, for read tokens).
    pub sub: Context,
    pub scope: Scope,
    pub aud: String,
    pub iss: String,
    pub iat: u64,
    pub exp: u64,
}

/// The verified identity of a caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub context: Context,
    pub scope: Scope,
    /// For collectors of the `kubernetes` auth mode: the node they run on. They may touch only
    /// contexts of pods on that node. `None`: no node restriction (HMAC tokens).
    pub node: Option<String>,
    /// For pods of the `kubernetes` auth mode: the namespace the pod runs in, recorded with the
    /// streams it creates. `None` for HMAC tokens and collectors (whose streams take the
    /// namespace of the pod the collector captured).
    pub namespace: Option<String>,
    /// For people of the `kubernetes` auth mode (a token from their kubeconfig): who they are.
    /// Such a principal is a reader whose every stream is also checked with a
    /// SubjectAccessReview: may this user `get pods/log` in the stream's namespace?
    pub user: Option<std::sync::Arc<User>>,
    /// For pods of the `kubernetes` auth mode: the pod's name, recorded with its streams.
    pub pod: Option<String>,
}

/// A Kubernetes user as a TokenReview names them, for SubjectAccessReviews on their behalf.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct User {
    pub username: String,
    pub uid: Option<String>,
    pub groups: Vec<String>,
    pub extra: std::collections::BTreeMap<String, Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("failed to read key file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to create key file {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key file {path} must hold at least 32 bytes as hex")]
    Invalid { path: PathBuf },
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("failed to sign token")]
    Sign(#[source] jsonwebtoken::errors::Error),
    #[error("context is not valid for this scope")]
    Context(#[from] ContextError),
}

/// The keys of the service: the token keys (the first signs new tokens, every one verifies,
/// each named in its tokens by a key id) and the key stream ids are derived with.
///
/// Both come from the server secret (`--key-file`) unless token keys of their own are given
/// (`--token-key-file`, see [`Keys::with_token_secrets`]): those can be rotated, while the
/// stream-id key never changes, as the ids it made must keep naming their streams.
#[derive(Clone)]
pub struct Keys {
    /// Never empty; the first signs.
    token_keys: Vec<TokenKey>,
    stream_id: [u8; 32],
}

/// One token key and its id (`kid` in the token's header): a hash of the key, so it names the
/// key without revealing anything of it.
#[derive(Clone)]
struct TokenKey {
    kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl TokenKey {
    fn from_secret(secret: &[u8]) -> Self {
        use sha2::Digest as _;
        let jwt = derive(secret, b"relay metadata-api token key v1");
        let kid = hex::encode(&Sha256::digest(jwt)[..8]);
        Self {
            kid,
            encoding: EncodingKey::from_secret(&jwt),
            decoding: DecodingKey::from_secret(&jwt),
        }
    }
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Keys(..)")
    }
}

fn derive(secret: &[u8], label: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(label);
    mac.finalize().into_bytes().into()
}

impl Keys {
    pub fn from_secret(secret: &[u8]) -> Self {
        Self {
            token_keys: vec![TokenKey::from_secret(secret)],
            stream_id: derive(secret, b"relay metadata-api stream id key v1"),
        }
    }

    /// Token keys of their own, for rotation: new tokens are signed with the first of
    /// `secrets`, tokens signed with any of them are accepted, and stream ids stay as they were.
    /// The server secret's own token key is accepted only if its secret is listed too (which is
    /// how a rotation away from it starts). An empty list changes nothing.
    pub fn with_token_secrets(mut self, secrets: &[Vec<u8>]) -> Self {
        if !secrets.is_empty() {
            self.token_keys = secrets.iter().map(|s| TokenKey::from_secret(s)).collect();
        }
        self
    }

    /// [`Keys::with_token_secrets`] with secrets from files, each created when missing as
    /// [`Keys::load_or_create`] creates the server's.
    pub fn with_token_key_files(self, paths: &[PathBuf]) -> Result<Self, KeyError> {
        let secrets = paths
            .iter()
            .map(|p| load_or_create_secret(p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.with_token_secrets(&secrets))
    }

    /// The id of the key new tokens are signed with.
    pub fn signing_kid(&self) -> &str {
        &self.signer().kid
    }

    fn signer(&self) -> &TokenKey {
        // Never empty: every constructor sets one key at least.
        &self.token_keys[0]
    }

    fn header(&self) -> Header {
        Header {
            kid: Some(self.signer().kid.clone()),
            ..Header::new(Algorithm::HS256)
        }
    }

    /// Loads the secret from `path`, creating it (mode 0600, 32 random bytes as hex) when missing.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        load_or_create_secret(path).map(|secret| Self::from_secret(&secret))
    }

    /// Mints a token for `context` with `scope`, valid for `ttl`.
    pub fn mint(&self, context: &str, scope: Scope, ttl: Duration) -> Result<String, TokenError> {
        let context = match scope {
            Scope::Read => Context::prefix(context)?,
            Scope::Write => Context::stream(context)?,
            // A collector's context names its node's scope; it writes in contexts it is given.
            Scope::Collector => Context::prefix(context)?,
            Scope::Delete => Context::prefix(context)?,
        };
        let now = now_secs();
        let claims = Claims {
            sub: context,
            scope,
            aud: AUDIENCE.to_owned(),
            iss: ISSUER.to_owned(),
            iat: now,
            exp: now + ttl.as_secs().max(1),
        };
        jsonwebtoken::encode(&self.header(), &claims, &self.signer().encoding)
            .map_err(TokenError::Sign)
    }

    /// Signs arbitrary claims (tests use it for expired or odd tokens).
    pub fn sign(&self, claims: &Claims) -> Result<String, TokenError> {
        jsonwebtoken::encode(&self.header(), claims, &self.signer().encoding)
            .map_err(TokenError::Sign)
    }

    /// Verifies a bearer token; `None` for anything that is not a valid, unexpired token of ours.
    pub fn verify(&self, token: &str) -> Option<Principal> {
        if token.len() > MAX_TOKEN_LEN {
            return None;
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[AUDIENCE]);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        validation.leeway = 5;
        // The key its id names; a token without one (signed before key ids) is tried with each.
        let kid = jsonwebtoken::decode_header(token).ok()?.kid;
        let data = self
            .token_keys
            .iter()
            .filter(|k| kid.as_ref().is_none_or(|kid| *kid == k.kid))
            .find_map(|k| jsonwebtoken::decode::<Claims>(token, &k.decoding, &validation).ok())?;
        let Claims { sub, scope, .. } = data.claims;
        if scope == Scope::Write && !sub.is_stream_context() {
            return None;
        }
        Some(Principal {
            context: sub,
            scope,
            node: None,
            namespace: None,
            user: None,
            pod: None,
        })
    }

    /// The stream id of (context, name, source): HMAC-SHA256, so ids cannot be guessed from names.
    pub fn stream_id(&self, context: &Context, name: &str, source: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.stream_id)
            .unwrap_or_else(|_| unreachable!());
        for part in [context.as_str(), name, source] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part.as_bytes());
        }
        hex::encode(mac.finalize().into_bytes())
    }
}

/// The secret in `path`, created (mode 0600, 32 random bytes as hex) when missing.
fn load_or_create_secret(path: &Path) -> Result<Vec<u8>, KeyError> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let secret = hex::decode(text.trim()).map_err(|_| KeyError::Invalid {
                path: path.to_owned(),
            })?;
            if secret.len() < 32 {
                return Err(KeyError::Invalid {
                    path: path.to_owned(),
                });
            }
            Ok(secret.to_vec())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let create = |source| KeyError::Create {
                path: path.to_owned(),
                source,
            };
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(create)?;
            }
            let secret: [u8; 32] = rand::random();
            // create_new: two processes racing to create the key must not both win.
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
            {
                Ok(mut f) => {
                    f.write_all(format!("{}\n", hex::encode(secret)).as_bytes())
                        .and_then(|()| f.sync_all())
                        .map_err(create)?;
                    Ok(secret.to_vec())
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    load_or_create_secret(path)
                }
                Err(e) => Err(create(e)),
            }
        }
        Err(source) => Err(KeyError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::from_secret(&[7; 32])
    }

    #[test]
    fn contexts() {
        assert!(Context::stream("workflows/w/triggers/t").is_ok());
        assert!(Context::stream("workflows/w/runs/1/steps/build").is_ok());
        assert!(Context::stream("workflows/w").is_err());
        assert!(Context::prefix("workflows/w").is_ok());
        assert!(Context::prefix("workflows/w/runs").is_ok());
        for bad in [
            "",
            "workflows",
            "workflows/",
            "workflows/../x",
            "workflows/w/other/x",
            "workflows/w/triggers/t/extra",
            "workflows/w/runs/r/steps/s/x",
            "/workflows/w",
            "workflows/w w",
        ] {
            assert!(
                Context::stream(bad).is_err() || bad == "workflows",
                "{bad:?} accepted"
            );
        }
        assert!(Context::prefix("workflows/../x").is_err());
        let w = Context::prefix("workflows/w").unwrap();
        assert!(w.covers(&Context::stream("workflows/w/triggers/t").unwrap()));
        assert!(!w.covers(&Context::stream("workflows/wx/triggers/t").unwrap()));
    }

    #[test]
    fn tokens_round_trip_and_reject_forgeries() {
        let k = keys();
        let t = k
            .mint(
                "workflows/w/triggers/t",
                Scope::Write,
                Duration::from_secs(60),
            )
            .unwrap();
        let p = k.verify(&t).unwrap();
        assert_eq!(p.scope, Scope::Write);
        assert_eq!(p.context.as_str(), "workflows/w/triggers/t");
        let other = Keys::from_secret(&[8; 32]);
        assert!(other.verify(&t).is_none());
        let mut tampered = t.clone();
        tampered.pop();
        assert!(k.verify(&tampered).is_none());
        assert!(k.verify("").is_none());
        assert!(k.verify("a.b.c").is_none());
        assert!(
            k.mint("workflows/w", Scope::Write, Duration::from_secs(60))
                .is_err()
        );
    }

    #[test]
    fn expired_tokens_fail() {
        let k = keys();
        let claims = Claims {
            sub: Context::stream("workflows/w/triggers/t").unwrap(),
            scope: Scope::Write,
            aud: AUDIENCE.into(),
            iss: ISSUER.into(),
            iat: 1,
            exp: 2,
        };
        let t = k.sign(&claims).unwrap();
        assert!(k.verify(&t).is_none());
    }

    #[test]
    fn token_keys_rotate_without_touching_stream_ids() {
        let old = keys();
        let c = Context::stream("workflows/w/triggers/t").unwrap();
        let id = old.stream_id(&c, "stdout", "entrypoint");
        let ttl = Duration::from_secs(60);
        let old_token = old.mint(c.as_str(), Scope::Write, ttl).unwrap();
        // Rotation: a new key signs, the old one (the server secret's) still verifies.
        let both = keys().with_token_secrets(&[vec![9; 32], vec![7; 32]]);
        assert_eq!(both.stream_id(&c, "stdout", "entrypoint"), id);
        assert!(both.verify(&old_token).is_some());
        let new_token = both.mint(c.as_str(), Scope::Write, ttl).unwrap();
        assert_ne!(both.signing_kid(), old.signing_kid());
        assert_eq!(
            jsonwebtoken::decode_header(&new_token)
                .unwrap()
                .kid
                .as_deref(),
            Some(both.signing_kid())
        );
        assert!(old.verify(&new_token).is_none());
        // After the grace period the old key goes: its tokens with it, not the streams.
        let new = keys().with_token_secrets(&[vec![9; 32]]);
        assert!(new.verify(&old_token).is_none());
        assert!(new.verify(&new_token).is_some());
        assert_eq!(new.stream_id(&c, "stdout", "entrypoint"), id);
        // A token without a key id (minted before them) is still checked against each key.
        let claims = Claims {
            sub: c.clone(),
            scope: Scope::Write,
            aud: AUDIENCE.into(),
            iss: ISSUER.into(),
            iat: now_secs(),
            exp: now_secs() + 60,
        };
        let legacy = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &TokenKey::from_secret(&[7; 32]).encoding,
        )
        .unwrap();
        assert!(both.verify(&legacy).is_some());
        assert!(new.verify(&legacy).is_none());
    }

    #[test]
    fn stream_ids_are_stable_and_distinct() {
        let k = keys();
        let c = Context::stream("workflows/w/triggers/t").unwrap();
        let a = k.stream_id(&c, "stdout", "entrypoint");
        assert_eq!(a, k.stream_id(&c, "stdout", "entrypoint"));
        assert_ne!(a, k.stream_id(&c, "stdout", "ebpf"));
        assert_ne!(a, k.stream_id(&c, "stderr", "entrypoint"));
        assert_eq!(a.len(), 64);
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
    }
}
