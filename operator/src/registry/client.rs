//! [`Registry`]: reads an image's command over the OCI distribution API (the manifest, the index
//! entry for the configured platform, the configuration blob), with caches of registry clients,
//! tags, manifests and configurations.

use std::{
    fmt,
    hash::Hash,
    net::IpAddr,
    num::NonZeroUsize,
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

use futures::StreamExt;
use lru::LruCache;
use oci_client::{
    Reference,
    client::{ClientConfig, ClientProtocol},
    manifest::{OciDescriptor, OciManifest},
    secrets::RegistryAuth,
};
use tracing::debug;

use super::error::Target;
use super::reference::split_host_port;
use super::{
    Credentials, PullAuth, RegistryConfig, RegistryError, image_command_from_config,
    normalize_reference, select_platform,
};
use crate::mutate::ImageCommand;

/// At most this many registry clients (each with its connection pool) are kept, whatever
/// [`RegistryConfig::cache_capacity`] says.
const MAX_CLIENTS: usize = 64;

/// Reads images' `ENTRYPOINT` and `CMD` from their registries, with caches. Cheap to clone:
/// clones share the caches.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    config: RegistryConfig,
    /// One client per registry and credentials: an `oci_client::Client` keeps the first
    /// credentials (and tokens) it sees for a registry.
    clients: Mutex<LruCache<(String, Option<Credentials>), oci_client::Client>>,
    /// Tag reference -> manifest digest, with when it was learnt.
    tags: Mutex<LruCache<String, (String, Instant)>>,
    /// Manifest digest (as referenced: an index's, or an image manifest's) -> command.
    manifests: Mutex<LruCache<String, ImageCommand>>,
    /// Image configuration digest -> command.
    configs: Mutex<LruCache<String, ImageCommand>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// A cache behind a mutex that no one holds across an `.await`.
fn cached<K: Hash + Eq, V: Clone>(cache: &Mutex<LruCache<K, V>>, key: &K) -> Option<V> {
    cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(key)
        .cloned()
}

fn remember<K: Hash + Eq, V>(cache: &Mutex<LruCache<K, V>>, key: K, value: V) {
    cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .put(key, value);
}

impl Registry {
    /// A registry client with empty caches.
    pub fn new(config: RegistryConfig) -> Self {
        let capacity = config.cache_capacity;
        Self {
            inner: Arc::new(Inner {
                clients: Mutex::new(LruCache::new(
                    capacity.min(NonZeroUsize::new(MAX_CLIENTS).unwrap_or(NonZeroUsize::MIN)),
                )),
                tags: Mutex::new(LruCache::new(capacity)),
                manifests: Mutex::new(LruCache::new(capacity)),
                configs: Mutex::new(LruCache::new(capacity)),
                config,
            }),
        }
    }

    /// The configuration it was made with.
    pub fn config(&self) -> &RegistryConfig {
        &self.inner.config
    }

    /// The `ENTRYPOINT` and `CMD` of `image` for the configured platform, with the credentials
    /// of `auth` that match the image's registry (each tried in turn while the registry says
    /// unauthorized; anonymous when none match).
    ///
    /// Cached: a digest-pinned reference until evicted, a tag's digest for
    /// [`RegistryConfig::tag_ttl`], image configurations by digest. The whole lookup takes at
    /// most [`RegistryConfig::timeout`].
    ///
    /// Note that the caches are shared by all callers: an image that one pod's credentials
    /// could read is answered from the cache for another pod without them. Only the command is
    /// disclosed, and the kubelet still needs credentials to pull the image.
    pub async fn image_command(
        &self,
        image: &str,
        auth: &PullAuth,
    ) -> Result<ImageCommand, RegistryError> {
        let reference = normalize_reference(image)?;
        let target = Target {
            image: reference.whole(),
            registry: reference.resolve_registry().to_owned(),
        };
        if let Some(command) = self.cached_command(&reference) {
            debug!(image = target.image, "image command from the cache");
            return Ok(command);
        }
        let credentials: Vec<Option<Credentials>> = {
            let found = auth.lookup(&reference);
            if found.is_empty() {
                vec![None]
            } else {
                found.into_iter().cloned().map(Some).collect()
            }
        };
        let timeout = self.inner.config.timeout;
        let attempts = async {
            let mut last = None;
            for credentials in credentials {
                match self.fetch(&reference, &target, credentials).await {
                    Err(e @ RegistryError::Unauthorized { .. }) => last = Some(e),
                    done => return done,
                }
            }
            Err(last.unwrap_or_else(|| target.unauthorized()))
        };
        match tokio::time::timeout(timeout, attempts).await {
            Ok(result) => result,
            Err(_) => Err(target.unreachable(format!("no answer within {timeout:?}"))),
        }
    }

    /// The command of `image` if the caches know it (a digest seen, or a tag learnt less than the
    /// tag TTL ago), without asking the registry.
    pub fn cached_image_command(&self, image: &str) -> Option<ImageCommand> {
        self.cached_command(&normalize_reference(image).ok()?)
    }

    fn cached_command(&self, reference: &Reference) -> Option<ImageCommand> {
        let digest = match reference.digest() {
            Some(digest) => digest.to_owned(),
            None => {
                let (digest, learnt) = cached(&self.inner.tags, &reference.whole())?;
                if learnt.elapsed() > self.inner.config.tag_ttl {
                    return None;
                }
                digest
            }
        };
        cached(&self.inner.manifests, &digest)
    }

    /// Whether `registry` (`host[:port]`) is reached over plain HTTP.
    fn plain_http(&self, registry: &str) -> bool {
        let config = &self.inner.config;
        if config
            .insecure_registries
            .iter()
            .any(|r| r.eq_ignore_ascii_case(registry))
        {
            return true;
        }
        let (host, _) = split_host_port(registry);
        config.insecure_localhost
            && (host.eq_ignore_ascii_case("localhost")
                || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()))
    }

    fn client(
        &self,
        target: &Target,
        credentials: &Option<Credentials>,
    ) -> Result<oci_client::Client, RegistryError> {
        let key = (target.registry.clone(), credentials.clone());
        if let Some(client) = cached(&self.inner.clients, &key) {
            return Ok(client);
        }
        let timeout = self.inner.config.timeout;
        let config = ClientConfig {
            protocol: if self.plain_http(&target.registry) {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            connect_timeout: Some(timeout),
            read_timeout: Some(timeout),
            ..ClientConfig::default()
        };
        let client = oci_client::Client::try_from(config)
            .map_err(|e| target.unreachable(format!("cannot make an HTTP client: {e}")))?;
        remember(&self.inner.clients, key, client.clone());
        Ok(client)
    }

    async fn fetch(
        &self,
        reference: &Reference,
        target: &Target,
        credentials: Option<Credentials>,
    ) -> Result<ImageCommand, RegistryError> {
        let client = self.client(target, &credentials)?;
        let auth = match credentials {
            Some(c) => RegistryAuth::Basic(c.username, c.password),
            None => RegistryAuth::Anonymous,
        };
        let (manifest, digest) = client
            .pull_manifest(reference, &auth)
            .await
            .map_err(|e| target.classify(e))?;
        if reference.digest().is_none() {
            remember(
                &self.inner.tags,
                reference.whole(),
                (digest.clone(), Instant::now()),
            );
        }
        if let Some(command) = cached(&self.inner.manifests, &digest) {
            return Ok(command);
        }
        let image_manifest = match manifest {
            OciManifest::Image(image) => image,
            OciManifest::ImageIndex(index) => {
                let platform = &self.inner.config.platform;
                let Some(entry) = select_platform(&index.manifests, platform) else {
                    return Err(RegistryError::NoPlatform {
                        image: target.image.clone(),
                        platform: platform.to_string(),
                        available: index
                            .manifests
                            .iter()
                            .filter_map(|e| e.platform.as_ref())
                            .map(|p| {
                                let mut s = format!("{}/{}", p.os, p.architecture);
                                if let Some(v) = &p.variant {
                                    s = format!("{s}/{v}");
                                }
                                s
                            })
                            .collect(),
                    });
                };
                debug!(image = target.image, digest = entry.digest, %platform, "picked from the index");
                let platform_reference = reference.clone_with_digest(entry.digest.clone());
                match client
                    .pull_manifest(&platform_reference, &auth)
                    .await
                    .map_err(|e| target.classify(e))?
                {
                    (OciManifest::Image(image), _) => image,
                    (OciManifest::ImageIndex(_), _) => {
                        return Err(target.malformed(format!(
                            "the index entry {} for {platform} is another index",
                            entry.digest
                        )));
                    }
                }
            }
        };
        let command = self
            .config_command(&client, reference, target, &image_manifest.config)
            .await?;
        remember(&self.inner.manifests, digest, command.clone());
        Ok(command)
    }

    /// The command of the image configuration `descriptor`, from the cache or the registry.
    async fn config_command(
        &self,
        client: &oci_client::Client,
        reference: &Reference,
        target: &Target,
        descriptor: &OciDescriptor,
    ) -> Result<ImageCommand, RegistryError> {
        if let Some(command) = cached(&self.inner.configs, &descriptor.digest) {
            return Ok(command);
        }
        let max = self.inner.config.max_config_size;
        if u64::try_from(descriptor.size).map_or(true, |size| size > max) {
            return Err(target.malformed(format!(
                "image configuration of {} bytes (the limit is {max})",
                descriptor.size
            )));
        }
        let mut stream = client
            .pull_blob_stream(reference, descriptor)
            .await
            .map_err(|e| target.classify(e))?;
        let mut data = Vec::new();
        // The stream checks the digest when it ends.
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| target.classify_io(&e))?;
            if (data.len() + chunk.len()) as u64 > max {
                return Err(
                    target.malformed(format!("image configuration larger than {max} bytes"))
                );
            }
            data.extend_from_slice(&chunk);
        }
        let command = image_command_from_config(&data)
            .map_err(|e| target.malformed(format!("image configuration: {e}")))?;
        remember(
            &self.inner.configs,
            descriptor.digest.clone(),
            command.clone(),
        );
        Ok(command)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_where_configured() {
        let registry = Registry::new(RegistryConfig {
            insecure_registries: vec!["reg.internal:5000".to_owned()],
            ..RegistryConfig::default()
        });
        assert!(registry.plain_http("reg.internal:5000"));
        assert!(!registry.plain_http("reg.internal:5001"));
        assert!(!registry.plain_http("127.0.0.1:5000"));
        let registry = Registry::new(RegistryConfig {
            insecure_localhost: true,
            ..RegistryConfig::default()
        });
        for local in [
            "127.0.0.1:5000",
            "localhost:1234",
            "[::1]:5000",
            "localhost",
        ] {
            assert!(registry.plain_http(local), "{local}");
        }
        assert!(!registry.plain_http("reg.example.com"));
    }
}
