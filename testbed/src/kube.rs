//! A real Kubernetes control plane for tests, without kubelet: etcd and `kube-apiserver` (and,
//! optionally, `kube-controller-manager`) 1.20.2 from the cache `cargo xtask testbed install`
//! fills, on loopback ports of their own, with a PKI generated for each instance.
//!
//! Pods can be created, read, patched (status included) and watched; none of them runs until a
//! [`crate::node::Node`] (the real kubelet and scheduler) is started on the instance. The API
//! server is ready for one: it authorizes nodes (`Node,RBAC`, `NodeRestriction`), trusts kubelet
//! serving certificates from its CA and reaches kubelets with a client certificate of its own.
//!
//! ```no_run
//! use testbed::kube::KubeApi;
//!
//! let Some(kube) = KubeApi::start_or_skip() else { return };
//! let client = kube.client().unwrap();
//! let version: serde_json::Value = client
//!     .get(format!("{}/version", kube.url()))
//!     .send()
//!     .unwrap()
//!     .json()
//!     .unwrap();
//! assert_eq!(version["gitVersion"], "v1.20.2");
//! // Or with kube-rs / kubectl: KUBECONFIG=kube.kubeconfig_path()
//! ```
//!
//! Neither etcd nor the API server needs root. Everything (processes, data, keys) goes away when
//! the [`KubeApi`] is dropped, also when the test panics.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;

use crate::layout;

/// The issuer written into service account tokens (`--service-account-issuer`), and the audience
/// they are for.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// The range Service cluster IPs come from; the `kubernetes` Service gets its first address.
pub const SERVICE_CLUSTER_IP_RANGE: &str = "10.96.0.0/24";

/// The people the API server knows besides its admin: `(name, groups)`, each with a bearer token
/// of their own ([`KubeApi::user_token`]) from a static token file, as an OIDC or webhook
/// authenticator would name a person. Tests give them rights with RBAC.
pub const USERS: [(&str, &[&str]); 3] = [("alice", &["tenant-devs"]), ("bob", &[]), ("carol", &[])];

/// The static token file of [`USERS`], in the control plane's directory.
const USER_TOKENS: &str = "users.csv";

/// How often a start-up condition is checked again.
const POLL: Duration = Duration::from_millis(50);

/// How many times a start is tried again when a port picked as free was taken meanwhile.
const PORT_ATTEMPTS: usize = 3;

/// Why the control plane `options` describe cannot run here, or `None` when it can: the binaries
/// must be in the cache (`kube-controller-manager` only when the options ask for it).
pub fn unavailable(options: &KubeOptions) -> Option<String> {
    let mut needed = vec![layout::etcd(), layout::kube_apiserver()];
    if options.controller_manager {
        needed.push(layout::kube_controller_manager());
    }
    needed.iter().find(|path| !path.exists()).map(|path| {
        format!(
            "{} is missing: run `cargo xtask testbed install`",
            path.display()
        )
    })
}

/// What to start besides etcd and the API server, and how long to wait for it.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    controller_manager: bool,
    without_controllers: Vec<String>,
    start_timeout: Duration,
}

impl Default for KubeOptions {
    fn default() -> Self {
        Self {
            controller_manager: false,
            without_controllers: Vec::new(),
            start_timeout: Duration::from_secs(90),
        }
    }
}

impl KubeOptions {
    /// etcd and the API server only, with the `ServiceAccount` admission plugin off (nothing would
    /// create the service accounts and tokens it requires).
    pub fn new() -> Self {
        Self::default()
    }

    /// Also runs `kube-controller-manager` (namespace deletion, garbage collection, default
    /// service accounts and their tokens, Jobs, ReplicaSets, ...), with the `ServiceAccount`
    /// admission plugin on. The start then also waits for the `default` service account of the
    /// `default` namespace and its token.
    pub fn controller_manager(mut self, on: bool) -> Self {
        self.controller_manager = on;
        self
    }

    /// Runs the controller manager without these controllers (`--controllers=*,-NAME`). Without
    /// `job`, a test can play the kubelet and the Job controller by patching a Job's status: the
    /// 1.20 Job controller writes a Job's whole status from its own view, so it would undo such a
    /// patch that lands while it syncs the Job.
    pub fn without_controllers(mut self, names: &[&str]) -> Self {
        self.without_controllers = names.iter().map(|n| (*n).to_owned()).collect();
        self
    }

    /// How long the whole start may take (90 s unless set; it usually takes 4-6 s).
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }
}

/// A running Kubernetes control plane on 127.0.0.1. Dropping it kills the processes and removes
/// its directory (etcd's data, the keys, the logs).
#[derive(Debug)]
pub struct KubeApi {
    /// Started in order (etcd, API server, controller manager); stopped in reverse.
    processes: Vec<Process>,
    dir: TempDir,
    url: String,
    etcd_url: String,
    ca_pem: String,
}

/// A child process with its log file.
#[derive(Debug)]
struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl KubeApi {
    /// Starts etcd and the API server ([`KubeOptions::new`]).
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(&KubeOptions::new())
    }

    /// Starts etcd, the API server and whatever `options` ask for, and waits until the API server
    /// reports ready on `/readyz` (and, with the controller manager, until the `default`
    /// service account has its token).
    ///
    /// Fails when the binaries are [unavailable], when a process exits or when the start takes
    /// longer than [`KubeOptions::start_timeout`]; the error carries the end of the logs.
    pub fn start_with(options: &KubeOptions) -> anyhow::Result<Self> {
        if let Some(reason) = unavailable(options) {
            bail!("{reason}");
        }
        let started = Instant::now();
        let deadline = started + options.start_timeout;
        let dir = tempfile::Builder::new()
            .prefix("relay-kube-")
            .tempdir()
            .context("cannot create a directory for the control plane")?;
        let pki = Pki::generate(dir.path()).context("cannot generate the PKI")?;
        let mut kube = Self {
            processes: Vec::new(),
            dir,
            url: String::new(),
            etcd_url: String::new(),
            ca_pem: pki.ca_pem,
        };
        kube.write_user_tokens()?;
        kube.start_etcd(deadline)?;
        kube.start_apiserver(options, deadline)?;
        kube.write_kubeconfig()?;
        if options.controller_manager {
            kube.start_controller_manager(&options.without_controllers, deadline)?;
        }
        eprintln!(
            "testbed: Kubernetes API server ready at {} in {:.1?}",
            kube.url,
            started.elapsed()
        );
        Ok(kube)
    }

    /// For tests: [`start`](Self::start) when the binaries are installed, otherwise `None` after
    /// [`skip_or_fail`](crate::skip_or_fail) has said why.
    ///
    /// # Panics
    ///
    /// When the binaries are missing and `RELAY_REQUIRE_TESTBED=1`, or when the control plane
    /// does not start although it is installed.
    pub fn start_or_skip() -> Option<Self> {
        Self::start_or_skip_with(&KubeOptions::new())
    }

    /// For tests: [`start_with`](Self::start_with), or `None` like
    /// [`start_or_skip`](Self::start_or_skip).
    ///
    /// # Panics
    ///
    /// As [`start_or_skip`](Self::start_or_skip).
    pub fn start_or_skip_with(options: &KubeOptions) -> Option<Self> {
        if let Some(reason) = unavailable(options) {
            crate::skip_or_fail(&reason);
            return None;
        }
        match Self::start_with(options) {
            Ok(kube) => Some(kube),
            Err(e) => panic!("the Kubernetes control plane did not start: {e:#}"),
        }
    }

    /// The API server's base URL, `https://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// etcd's client URL, `http://127.0.0.1:<port>` (plain HTTP, loopback only).
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }

    /// A kubeconfig (JSON, which is YAML) for the admin user, with the CA, certificate and key
    /// inline: for `KUBECONFIG`, `kubectl --kubeconfig` or kube-rs's
    /// `Kubeconfig::read_from`/`Config::from_custom_kubeconfig`.
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// The PEM of the CA that signed the API server's serving certificate and that the API server
    /// trusts for client certificates.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// [`ca_pem`](Self::ca_pem) as a file.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join(Pki::CA)
    }

    /// The admin's client certificate (PEM; group `system:masters`, so RBAC allows everything).
    pub fn admin_cert_path(&self) -> PathBuf {
        self.dir.path().join(Pki::ADMIN_CERT)
    }

    /// The admin's private key (PEM, PKCS#8).
    pub fn admin_key_path(&self) -> PathBuf {
        self.dir.path().join(Pki::ADMIN_KEY)
    }

    /// The key service account tokens are signed with (PEM, PKCS#8, ECDSA P-256, so ES256
    /// tokens); the API server's `--service-account-signing-key-file`.
    pub fn service_account_signing_key_path(&self) -> PathBuf {
        self.dir.path().join(Pki::SA_KEY)
    }

    /// The public half of [`service_account_signing_key_path`](Self::service_account_signing_key_path)
    /// (PEM), against which tokens verify; the API server's `--service-account-key-file`.
    pub fn service_account_public_key_path(&self) -> PathBuf {
        self.dir.path().join(Pki::SA_PUB)
    }

    /// The instance's directory: PKI, kubeconfig, etcd's data and the logs
    /// (`etcd.log`, `kube-apiserver.log`, `kube-controller-manager.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A blocking HTTP client that trusts only this instance's CA and presents the admin's client
    /// certificate. Requests time out after 30 s: give watches a `timeoutSeconds` below that.
    pub fn client(&self) -> anyhow::Result<reqwest::blocking::Client> {
        let ca = reqwest::Certificate::from_pem(self.ca_pem.as_bytes())?;
        let mut identity = fs::read(self.admin_cert_path())?;
        identity.extend(fs::read(self.admin_key_path())?);
        Ok(reqwest::blocking::Client::builder()
            .tls_certs_only([ca])
            .identity(reqwest::Identity::from_pem(&identity)?)
            .timeout(Duration::from_secs(30))
            .build()?)
    }

    /// A JSON REST helper over [`KubeApi::client`]: `get`, `post`, `merge_patch` of API paths.
    pub fn rest(&self) -> anyhow::Result<Rest> {
        Ok(Rest {
            base: self.url.clone(),
            http: self.client()?,
        })
    }

    /// `kubectl` (1.20.2) with this instance's kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut kubectl = Command::new(layout::kubectl());
        kubectl
            .arg("--kubeconfig")
            .arg(self.kubeconfig_path())
            .stdin(Stdio::null());
        kubectl
    }

    /// The end of a process's log (`etcd`, `kube-apiserver`, `kube-controller-manager`).
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        log_tail(&self.dir.path().join(format!("{name}.log")), lines)
    }

    fn start_etcd(&mut self, deadline: Instant) -> anyhow::Result<()> {
        let data = self.dir.path().join("etcd");
        self.start_on_free_ports(deadline, |kube, deadline| {
            let (client, peer) = (
                crate::ports::try_free_port()?,
                crate::ports::try_free_port()?,
            );
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let mut etcd = Command::new(layout::etcd());
            etcd.arg("--name=testbed")
                .arg(format!("--data-dir={}", data.display()))
                .arg(format!("--listen-client-urls={client_url}"))
                .arg(format!("--advertise-client-urls={client_url}"))
                .arg(format!("--listen-peer-urls={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                .arg(format!("--initial-cluster=testbed={peer_url}"))
                .arg("--initial-cluster-state=new")
                // Data that lives as long as a test need not survive a power cut.
                .arg("--unsafe-no-fsync")
                .args(["--logger=zap", "--log-level=warn"]);
            kube.spawn("etcd", etcd)?;
            let health = reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()?;
            let url = format!("{client_url}/health");
            kube.wait_for("etcd", deadline, || {
                Ok(health
                    .get(&url)
                    .send()
                    .ok()
                    .filter(|r| r.status().is_success())
                    .and_then(|r| r.json::<serde_json::Value>().ok())
                    .is_some_and(|h| h["health"] == "true"))
            })?;
            kube.etcd_url = client_url;
            Ok(())
        })
    }

    /// Writes the static token file of [`USERS`]: `token,user,uid,"group,..."` per line, each
    /// token 32 random hex characters.
    fn write_user_tokens(&self) -> anyhow::Result<()> {
        let mut csv = String::new();
        for (i, (user, groups)) in USERS.iter().enumerate() {
            let mut random = [0u8; 16];
            std::io::Read::read_exact(&mut fs::File::open("/dev/urandom")?, &mut random)?;
            let token: String = random.iter().map(|b| format!("{b:02x}")).collect();
            csv.push_str(&format!(
                "{token},{user},uid-{i},\"{}\"\n",
                groups.join(",")
            ));
        }
        fs::write(self.dir.path().join(USER_TOKENS), csv)
            .context("cannot write the user token file")
    }

    /// The bearer token of `user`, one of [`USERS`].
    ///
    /// # Panics
    ///
    /// When `user` is not one of them.
    pub fn user_token(&self, user: &str) -> String {
        let csv = fs::read_to_string(self.dir.path().join(USER_TOKENS)).unwrap_or_default();
        csv.lines()
            .find_map(|l| {
                let mut f = l.split(',');
                let token = f.next()?;
                (f.next()? == user).then(|| token.to_owned())
            })
            .unwrap_or_else(|| panic!("{user} is not one of the test bed's users"))
    }

    fn start_apiserver(&mut self, options: &KubeOptions, deadline: Instant) -> anyhow::Result<()> {
        let dir = self.dir.path().to_path_buf();
        let file = |name: &str| format!("{}", dir.join(name).display());
        self.start_on_free_ports(deadline, |kube, deadline| {
            let port = crate::ports::try_free_port()?;
            let mut apiserver = Command::new(layout::kube_apiserver());
            apiserver
                .arg(format!("--etcd-servers={}", kube.etcd_url))
                .arg("--bind-address=127.0.0.1")
                .arg("--advertise-address=127.0.0.1")
                .arg(format!("--secure-port={port}"))
                // The endpoint reconciler would try to publish 127.0.0.1 as the `kubernetes`
                // Service's endpoint, which validation refuses (loopback).
                .arg("--endpoint-reconciler-type=none")
                .arg(format!("--cert-dir={}", file("apiserver-certs")))
                .arg(format!("--tls-cert-file={}", file(Pki::SERVING_CERT)))
                .arg(format!("--tls-private-key-file={}", file(Pki::SERVING_KEY)))
                .arg(format!("--client-ca-file={}", file(Pki::CA)))
                .arg(format!("--token-auth-file={}", file(USER_TOKENS)))
                .arg(format!("--service-account-key-file={}", file(Pki::SA_PUB)))
                .arg(format!(
                    "--service-account-signing-key-file={}",
                    file(Pki::SA_KEY)
                ))
                .arg(format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"))
                .arg(format!(
                    "--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"
                ))
                .arg("--authorization-mode=Node,RBAC")
                // A real kubelet ([`crate::node`]) may change only its own Node and its pods.
                .arg("--enable-admission-plugins=NodeRestriction")
                // How the API server reaches kubelets (`pods/log`, `exec`): the kubelet's serving
                // certificate is from our CA, and it lets the API server in as system:masters.
                .arg(format!("--kubelet-certificate-authority={}", file(Pki::CA)))
                .arg(format!(
                    "--kubelet-client-certificate={}",
                    file(Pki::KUBELET_CLIENT_CERT)
                ))
                .arg(format!(
                    "--kubelet-client-key={}",
                    file(Pki::KUBELET_CLIENT_KEY)
                ))
                .arg("--allow-privileged=true")
                .arg("--profiling=false");
            if !options.controller_manager {
                // Without the controller manager no service account (nor token) ever exists,
                // and the plugin would refuse every pod.
                apiserver.arg("--disable-admission-plugins=ServiceAccount");
            }
            kube.spawn("kube-apiserver", apiserver)?;
            kube.url = format!("https://127.0.0.1:{port}");
            let client = kube.client()?;
            let readyz = format!("{}/readyz", kube.url);
            // `/readyz` can answer before the bootstrap controller made the `default` namespace,
            // and a test's first object there would be refused (404).
            let default_ns = format!("{}/api/v1/namespaces/default", kube.url);
            kube.wait_for("kube-apiserver", deadline, || {
                let ok = |url: &str| {
                    client
                        .get(url)
                        .timeout(Duration::from_secs(5))
                        .send()
                        .is_ok_and(|r| r.status().is_success())
                };
                Ok(ok(&readyz) && ok(&default_ns))
            })
        })
    }

    fn start_controller_manager(
        &mut self,
        without: &[String],
        deadline: Instant,
    ) -> anyhow::Result<()> {
        let file = |name: &str| format!("{}", self.dir.path().join(name).display());
        let mut cm = Command::new(layout::kube_controller_manager());
        if !without.is_empty() {
            let off: Vec<String> = without.iter().map(|name| format!("-{name}")).collect();
            cm.arg(format!("--controllers=*,{}", off.join(",")));
        }
        cm.arg(format!("--kubeconfig={}", file("kubeconfig")))
            // The admin is in system:masters: no per-controller service account credentials.
            .arg("--use-service-account-credentials=false")
            .arg(format!(
                "--service-account-private-key-file={}",
                file(Pki::SA_KEY)
            ))
            .arg(format!("--root-ca-file={}", file(Pki::CA)))
            // Else it creates /usr/libexec/kubernetes/kubelet-plugins/volume/exec on the host.
            .arg(format!("--flex-volume-plugin-dir={}", file("flexvolume")))
            .arg("--leader-elect=false")
            // No serving at all (the defaults, 10252 and 10257, would clash between instances).
            .arg("--port=0")
            .arg("--secure-port=0")
            .arg("--profiling=false");
        self.spawn("kube-controller-manager", cm)?;
        // Pods are admitted only once their namespace's `default` service account has a token;
        // the `default` namespace's proves the service account and token controllers work.
        let client = self.client()?;
        let url = format!(
            "{}/api/v1/namespaces/default/serviceaccounts/default",
            self.url
        );
        self.wait_for("kube-controller-manager", deadline, || {
            let Ok(response) = client.get(&url).send() else {
                return Ok(false);
            };
            if !response.status().is_success() {
                return Ok(false);
            }
            let account: serde_json::Value = response.json()?;
            Ok(account["secrets"]
                .as_array()
                .is_some_and(|secrets| !secrets.is_empty()))
        })
    }

    /// Runs `start` (which picks free ports and starts one process) again when the process died
    /// because a port picked as free was taken in between.
    fn start_on_free_ports(
        &mut self,
        deadline: Instant,
        mut start: impl FnMut(&mut Self, Instant) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut attempt = 1;
        loop {
            let started = start(self, deadline);
            let Err(e) = started else { return Ok(()) };
            let port_taken = self.processes.last_mut().is_some_and(|p| {
                matches!(p.child.try_wait(), Ok(Some(_)))
                    && fs::read_to_string(&p.log)
                        .is_ok_and(|log| log.contains("address already in use"))
            });
            if !port_taken || attempt >= PORT_ATTEMPTS {
                return Err(e);
            }
            if let Some(mut dead) = self.processes.pop() {
                let _ = dead.child.wait();
            }
            attempt += 1;
        }
    }

    /// Starts `cmd` with its output going to `<name>.log`; from then on, dropping `self` stops it.
    fn spawn(&mut self, name: &'static str, mut cmd: Command) -> anyhow::Result<()> {
        let log = self.dir.path().join(format!("{name}.log"));
        let file =
            fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = cmd
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        self.processes.push(Process { name, child, log });
        Ok(())
    }

    /// Waits until `ready` holds, failing when any process exits or at `deadline`.
    fn wait_for(
        &mut self,
        what: &str,
        deadline: Instant,
        mut ready: impl FnMut() -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        loop {
            for p in &mut self.processes {
                if let Some(status) = p.child.try_wait()? {
                    bail!("{} exited with {status}:\n{}", p.name, log_tail(&p.log, 30));
                }
            }
            if ready()? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> = self
                    .processes
                    .iter()
                    .map(|p| format!("--- {}:\n{}", p.name, log_tail(&p.log, 20)))
                    .collect();
                bail!("{what} was not ready in time:\n{}", logs.join("\n"));
            }
            thread::sleep(POLL);
        }
    }

    fn write_kubeconfig(&self) -> anyhow::Result<()> {
        let read = |name: &str| -> anyhow::Result<String> {
            Ok(BASE64.encode(fs::read(self.dir.path().join(name))?))
        };
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{
                "name": "testbed",
                "cluster": {
                    "server": self.url,
                    "certificate-authority-data": read(Pki::CA)?,
                },
            }],
            "users": [{
                "name": "admin",
                "user": {
                    "client-certificate-data": read(Pki::ADMIN_CERT)?,
                    "client-key-data": read(Pki::ADMIN_KEY)?,
                },
            }],
            "contexts": [{
                "name": "testbed",
                "context": {"cluster": "testbed", "user": "admin", "namespace": "default"},
            }],
            "current-context": "testbed",
        });
        let path = self.kubeconfig_path();
        fs::write(&path, serde_json::to_vec_pretty(&config)?)
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        let panicking = thread::panicking();
        while let Some(mut p) = self.processes.pop() {
            if panicking {
                eprintln!(
                    "testbed: end of the {} log:\n{}",
                    p.name,
                    log_tail(&p.log, 15)
                );
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        // The TempDir removes the directory next.
    }
}

/// The last `lines` lines of a log file.
fn log_tail(path: &Path, lines: usize) -> String {
    let log = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What a certificate from [`KubeApi::issue_certificate`] is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Usage {
    /// TLS client authentication (a kubeconfig's user).
    Client,
    /// TLS serving for the names and addresses given.
    Server,
}

impl KubeApi {
    /// Issues a certificate from this instance's CA for `common_name` (in `organization`, the
    /// group Kubernetes reads, when given) and, for a server, `names` (DNS names or IP
    /// addresses), and writes it and its new key (PEM) to `cert` and `key`.
    pub(crate) fn issue_certificate(
        &self,
        common_name: &str,
        organization: Option<&str>,
        names: &[&str],
        usage: Usage,
        cert: &Path,
        key: &Path,
    ) -> anyhow::Result<()> {
        let ca_key = KeyPair::from_pem(&fs::read_to_string(self.dir.path().join(Pki::CA_KEY))?)?;
        let issuer = Issuer::new(Pki::ca_params()?, ca_key);
        let pair = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        if let Some(organization) = organization {
            params
                .distinguished_name
                .push(DnType::OrganizationName, organization);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match usage {
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
        }];
        fs::write(cert, params.signed_by(&pair, &issuer)?.pem())
            .with_context(|| format!("cannot write {}", cert.display()))?;
        fs::write(key, pair.serialize_pem())
            .with_context(|| format!("cannot write {}", key.display()))
    }
}

/// The keys and certificates of one instance, written into its directory.
struct Pki {
    ca_pem: String,
}

impl Pki {
    const CA: &'static str = "ca.crt";
    /// Kept so that [`KubeApi::issue_certificate`] can issue a node's certificates later.
    const CA_KEY: &'static str = "ca.key";
    const KUBELET_CLIENT_CERT: &'static str = "kubelet-client.crt";
    const KUBELET_CLIENT_KEY: &'static str = "kubelet-client.key";
    const SERVING_CERT: &'static str = "apiserver.crt";
    const SERVING_KEY: &'static str = "apiserver.key";
    const ADMIN_CERT: &'static str = "admin.crt";
    const ADMIN_KEY: &'static str = "admin.key";
    const SA_KEY: &'static str = "service-account.key";
    const SA_PUB: &'static str = "service-account.pub";

    /// A CA, the API server's serving certificate (127.0.0.1, localhost and the in-cluster
    /// names), an admin client certificate in `system:masters`, and the service account key.
    fn generate(dir: &Path) -> anyhow::Result<Self> {
        let write = |name: &str, pem: &str| -> anyhow::Result<()> {
            let path = dir.join(name);
            fs::write(&path, pem).with_context(|| format!("cannot write {}", path.display()))
        };

        let ca_key = KeyPair::generate()?;
        let ca = Self::ca_params()?;
        let ca_pem = ca.self_signed(&ca_key)?.pem();
        write(Self::CA, &ca_pem)?;
        write(Self::CA_KEY, &ca_key.serialize_pem())?;
        let issuer = Issuer::new(ca, ca_key);

        let serving_key = KeyPair::generate()?;
        let mut serving = CertificateParams::new(
            [
                "127.0.0.1",
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
                // The `kubernetes` Service's cluster IP: the first of SERVICE_CLUSTER_IP_RANGE.
                "10.96.0.1",
            ]
            .map(String::from)
            .to_vec(),
        )?;
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        write(
            Self::SERVING_CERT,
            &serving.signed_by(&serving_key, &issuer)?.pem(),
        )?;
        write(Self::SERVING_KEY, &serving_key.serialize_pem())?;

        let admin_key = KeyPair::generate()?;
        let mut admin = CertificateParams::new(Vec::<String>::new())?;
        admin
            .distinguished_name
            .push(DnType::CommonName, "relay-testbed-admin");
        admin
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        admin.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        write(
            Self::ADMIN_CERT,
            &admin.signed_by(&admin_key, &issuer)?.pem(),
        )?;
        write(Self::ADMIN_KEY, &admin_key.serialize_pem())?;

        // The API server's identity towards kubelets: in system:masters, so the kubelet's
        // webhook authorization (a SubjectAccessReview) lets it read logs and exec.
        let kubelet_client_key = KeyPair::generate()?;
        let mut kubelet_client = CertificateParams::new(Vec::<String>::new())?;
        kubelet_client
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver-kubelet-client");
        kubelet_client
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        kubelet_client.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        kubelet_client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        write(
            Self::KUBELET_CLIENT_CERT,
            &kubelet_client
                .signed_by(&kubelet_client_key, &issuer)?
                .pem(),
        )?;
        write(
            Self::KUBELET_CLIENT_KEY,
            &kubelet_client_key.serialize_pem(),
        )?;

        let sa_key = KeyPair::generate()?;
        write(Self::SA_KEY, &sa_key.serialize_pem())?;
        write(Self::SA_PUB, &sa_key.public_key_pem())?;
        Ok(Self { ca_pem })
    }

    /// The CA's parameters: the same each time, so that an [`Issuer`] made again from them and
    /// the CA key names the CA certificate written at start.
    fn ca_params() -> anyhow::Result<CertificateParams> {
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.distinguished_name
            .push(DnType::CommonName, "relay-testbed-ca");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ok(ca)
    }
}

/// JSON requests to the API server as its admin (see [`KubeApi::rest`]).
#[derive(Debug, Clone)]
pub struct Rest {
    base: String,
    http: reqwest::blocking::Client,
}

impl Rest {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `GET path`: the object, or `None` on any non-success status (404 above all).
    pub fn get(&self, path: &str) -> anyhow::Result<Option<serde_json::Value>> {
        let response = self.http.get(self.url(path)).send()?;
        if !response.status().is_success() {
            return Ok(None);
        }
        Ok(Some(response.json()?))
    }

    /// `POST path` with `body`; an error carries the status and the API server's answer.
    pub fn post(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let response = self.http.post(self.url(path)).json(body).send()?;
        let status = response.status();
        let answer: serde_json::Value = response.json()?;
        if !status.is_success() {
            bail!("POST {path}: {status}: {answer}");
        }
        Ok(answer)
    }

    /// `DELETE path` with `gracePeriodSeconds` = `grace`; a 404 is fine.
    pub fn delete(&self, path: &str, grace: u32) -> anyhow::Result<()> {
        let response = self
            .http
            .delete(self.url(path))
            .json(&serde_json::json!({"gracePeriodSeconds": grace}))
            .send()?;
        let status = response.status();
        if !status.is_success() && status != reqwest::StatusCode::NOT_FOUND {
            bail!("DELETE {path}: {status}: {}", response.text()?);
        }
        Ok(())
    }

    /// What `deploy/` installs for the operator, shaped for the test bed: the `Tenant` CRD `crd`
    /// (the operator's own, passed in since this crate does not depend on it), the namespaces
    /// `relay-system` and `namespaces`, and the MutatingWebhookConfiguration
    /// `relay-pod-injection` calling `https://127.0.0.1:{webhook_port}/mutate-pods` (there is no
    /// Service network), failurePolicy Fail, without caBundle (the operator fills it in).
    pub fn install_relay(
        &self,
        crd: &serde_json::Value,
        namespaces: &[&str],
        webhook_port: u16,
    ) -> anyhow::Result<()> {
        self.post(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            crd,
        )?;
        for ns in std::iter::once(&"relay-system").chain(namespaces) {
            self.post(
                "/api/v1/namespaces",
                &serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            )?;
        }
        self.post(
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
            &serde_json::json!({
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "MutatingWebhookConfiguration",
                "metadata": {"name": "relay-pod-injection"},
                "webhooks": [pod_webhook(
                    "pods.relay.sh",
                    &format!("https://127.0.0.1:{webhook_port}/mutate-pods"),
                    ("relay.sh/tenant", "true"),
                    "Fail",
                )],
            }),
        )?;
        Ok(())
    }

    /// Marks Job `name` in `namespace` complete (one pod succeeded), as the Job controller
    /// reports it once its pod finished; run the controller manager without its Job controller
    /// (see [`KubeOptions::without_controllers`]).
    pub fn complete_job(&self, namespace: &str, name: &str) -> anyhow::Result<()> {
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        self.merge_patch(
            &format!("/apis/batch/v1/namespaces/{namespace}/jobs/{name}/status"),
            &serde_json::json!({"status": {"succeeded": 1, "completionTime": now, "conditions": [
                {"type": "Complete", "status": "True", "lastProbeTime": now, "lastTransitionTime": now}]}}),
        )?;
        Ok(())
    }

    /// `PATCH path` with a JSON merge patch (`.../status` paths patch the status subresource).
    pub fn merge_patch(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let response = self
            .http
            .patch(self.url(path))
            .header("Content-Type", "application/merge-patch+json")
            .body(body.to_string())
            .send()?;
        let status = response.status();
        let answer: serde_json::Value = response.json()?;
        if !status.is_success() {
            bail!("PATCH {path}: {status}: {answer}");
        }
        Ok(answer)
    }
}

/// A mutating webhook entry on pod CREATE in namespaces labelled `selector`, called at `url`
/// (`admissionReviewVersions` v1, no side effects, 10 s timeout), for a
/// MutatingWebhookConfiguration's `webhooks`.
pub fn pod_webhook(
    name: &str,
    url: &str,
    selector: (&str, &str),
    failure_policy: &str,
) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
        "failurePolicy": failure_policy,
        "timeoutSeconds": 10,
        "namespaceSelector": { "matchLabels": { selector.0: selector.1 } },
        "rules": [{
            "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
            "resources": ["pods"], "scope": "Namespaced",
        }],
        "clientConfig": { "url": url },
    })
}
