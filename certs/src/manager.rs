//! The certificate manager: owns the store, the resolver, the challenge responders, the DNS-01
//! zone and the [`Scheduler`]; its tokio driver places the orders the scheduler asks for.

use crate::acme::{AcmeClient, AriLookup, ChallengeTargets, apply_challenge};
use crate::backend::{CertBackend, Challenge, LocalBackend, LockAttempt, OrderGuard};
use crate::challenge::ChallengeResponder;
use crate::config::{CertConfig, CustomChallenge, Directory};
use crate::devca::{DevCa, IssuedPem};
use crate::dns::{ChallengeZone, DnsServer, serve_dns};
use crate::error::{CertError, IssueError};
use crate::pem::{certified_key, leaf_info, normalize_name, rfc3339, unix_secs};
use crate::resolver::CertResolver;
use crate::schedule::{Action, Scheduler, Validity};
use crate::status::{CertState, CertStatus};
use crate::store::{CertStore, StoredCert};
use instant_acme::ChallengeType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rustls::ServerConfig;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::sync::{Notify, mpsc};

/// The longest the driver sleeps without re-checking its schedule.
const MAX_IDLE: Duration = Duration::from_secs(3600);
/// Backoff between attempts to bind the DNS-01 responder.
const DNS_RETRY_INITIAL: Duration = Duration::from_secs(1);
const DNS_RETRY_MAX: Duration = Duration::from_secs(300);
/// Backoff (first, most) between failed ARI lookups.
const ARI_RETRY: (Duration, Duration) = (Duration::from_secs(60), Duration::from_secs(86400));
/// How soon to look again when another gateway holds a certificate's order lock (its
/// certificate usually arrives through the backend's changes first).
const LOCK_BUSY_RETRY: Duration = Duration::from_secs(5);

#[derive(Default, Clone)]
struct Metrics {
    orders: Family<Vec<(String, String)>, Counter>,
    not_after: Family<Vec<(String, String)>, Gauge>,
    failures: Family<Vec<(String, String)>, Gauge>,
    last_error: Family<Vec<(String, String)>, Gauge>,
}

struct State {
    sched: Scheduler,
    /// Desired certificates: key → names to order.
    requests: BTreeMap<String, Vec<String>>,
    /// Certificates from the store (and issued since), by key.
    stored: HashMap<String, StoredCert>,
    /// Keys whose ARI window should be fetched.
    ari_pending: Vec<String>,
    /// Labels of the `last_error` metric per key, to clear it on success.
    error_labels: HashMap<String, Vec<(String, String)>>,
}

struct Inner {
    config: CertConfig,
    directory: Directory,
    contact: String,
    backend: Arc<dyn CertBackend>,
    resolver: Arc<CertResolver>,
    challenges: Arc<ChallengeResponder>,
    alpn_config: Arc<ServerConfig>,
    farmer: Option<String>,
    dns_zone: Option<ChallengeZone>,
    devca: Option<DevCa>,
    acme: tokio::sync::Mutex<Option<Arc<AcmeClient>>>,
    state: Mutex<State>,
    wake: Notify,
    orders_placed: Arc<AtomicU64>,
    metrics: Metrics,
}

/// Cheap to clone; all clones share one manager.
#[derive(Clone)]
pub struct CertManager {
    inner: Arc<Inner>,
}

/// How one scheduled order ended.
enum OrderOutcome {
    /// Issued here and committed to the backend.
    Issued(IssuedPem),
    /// Another gateway holds the order lock.
    Busy { holder: String },
    /// Another gateway stored a current certificate meanwhile: serve it, order nothing.
    Stored(StoredCert),
}

enum Event {
    Issued {
        key: String,
        result: Result<OrderOutcome, IssueError>,
    },
    /// The backend's certificates changed (another gateway committed one).
    StoreChanged,
    Window {
        key: String,
        start: SystemTime,
        end: SystemTime,
    },
}

impl CertManager {
    /// Opens the on-disk store in `state_dir` and loads its certificates; does no network
    /// I/O. The farmer wildcard (when `farmer_domain` is set) is desired from the start;
    /// stored certificates are served as soon as their name is desired, through
    /// [`Self::resolver`].
    pub fn new(config: CertConfig) -> Result<Self, CertError> {
        let store = CertStore::open(&config.state_dir)?;
        Self::with_backend(config, Arc::new(LocalBackend::new(store)))
    }

    /// As [`Self::new`], with certificates, the ACME account, order locks and challenge
    /// publication in `backend` (a fleet's shared store) instead of `state_dir`'s files.
    pub fn with_backend(
        config: CertConfig,
        backend: Arc<dyn CertBackend>,
    ) -> Result<Self, CertError> {
        let directory = config.acme.directory()?;
        config.renewal.validate()?;
        let contact = match directory {
            Directory::Acme(_) => config.acme.contact()?,
            Directory::LocalDevCa => String::new(),
        };
        let devca = match directory {
            Directory::LocalDevCa => Some(DevCa::load_or_create(config.state_dir.join("dev-ca"))?),
            Directory::Acme(_) => None,
        };
        let farmer = config
            .farmer_domain
            .as_deref()
            .map(normalize_name)
            .transpose()?;
        let dns_zone = match &farmer {
            Some(d) => {
                let ns = config.dns.ns_host.clone().unwrap_or_else(|| d.clone());
                Some(ChallengeZone::new(d, &ns)?)
            }
            None => None,
        };
        let mut stored = HashMap::new();
        for c in backend.load_all() {
            match c {
                Ok(c) => {
                    stored.insert(c.key.clone(), c);
                }
                Err(e) => tracing::warn!("certificate store: {e}; it will be re-issued if needed"),
            }
        }
        let resolver = Arc::new(CertResolver::default());
        let challenges = resolver.challenges();
        let seed: u64 = rand::random();
        let manager = CertManager {
            inner: Arc::new(Inner {
                directory,
                contact,
                backend,
                resolver,
                alpn_config: challenges.tls_alpn01_config(),
                challenges,
                farmer,
                dns_zone,
                devca,
                acme: tokio::sync::Mutex::new(None),
                state: Mutex::new(State {
                    sched: Scheduler::new(config.renewal.clone(), seed),
                    requests: BTreeMap::new(),
                    stored,
                    ari_pending: Vec::new(),
                    error_labels: HashMap::new(),
                }),
                config,
                wake: Notify::new(),
                orders_placed: Arc::new(AtomicU64::new(0)),
                metrics: Metrics::default(),
            }),
        };
        manager.set_desired(Vec::<String>::new());
        Ok(manager)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every update is one step).
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The rustls resolver for the :443 listener (exact SNI, then `*.parent`); the gateway
    /// swaps its configured certificates into it too.
    pub fn resolver(&self) -> Arc<CertResolver> {
        self.inner.resolver.clone()
    }

    /// A rustls server config using [`Self::resolver`] with the given ALPN protocols.
    pub fn server_config(&self, alpn: Vec<Vec<u8>>) -> Arc<ServerConfig> {
        let mut config = ServerConfig::builder_with_provider(crate::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("ring supports TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(self.inner.resolver.clone());
        config.alpn_protocols = alpn;
        Arc::new(config)
    }

    /// Body for `GET /.well-known/acme-challenge/<token>` on :80, or `None` (404).
    pub fn http01_response(&self, token: &str) -> Option<String> {
        self.inner.challenges.http01_response(token)
    }

    /// The config for a :443 handshake whose ClientHello offers `acme-tls/1`.
    pub fn tls_alpn01_config(&self) -> Arc<ServerConfig> {
        self.inner.alpn_config.clone()
    }

    /// The shared challenge responder (HTTP-01 tokens, TLS-ALPN-01 certificates).
    pub fn challenges(&self) -> Arc<ChallengeResponder> {
        self.inner.challenges.clone()
    }

    /// The `_acme-challenge.<farmer domain>` zone, to serve it from another DNS server.
    pub fn dns_zone(&self) -> Option<ChallengeZone> {
        self.inner.dns_zone.clone()
    }

    /// The development CA, when `acme.directory = "local-dev-ca"`.
    pub fn dev_ca(&self) -> Option<&DevCa> {
        self.inner.devca.as_ref()
    }

    /// Orders placed by this manager since it started.
    pub fn orders_placed(&self) -> u64 {
        self.inner.orders_placed.load(Ordering::Relaxed)
    }

    /// Sets the names the gateway serves besides the farmer wildcard: custom domains only once
    /// the reservation layer has verified them. Names covered by the farmer wildcard
    /// (`<domain>` and `<label>.<domain>`) need no certificate of their own; invalid names are
    /// skipped with a warning. Certificates for names no longer desired stop being served
    /// and renewed (their files stay in the store).
    pub fn set_desired<I: IntoIterator<Item = String>>(&self, names: I) {
        let mut requests = BTreeMap::new();
        if let Some(d) = &self.inner.farmer {
            requests.insert(format!("*.{d}"), vec![format!("*.{d}"), d.clone()]);
        }
        for n in names {
            let n = match normalize_name(&n) {
                Ok(n) if !n.starts_with("*.") => n,
                Ok(_) => {
                    tracing::warn!(name = %n, "wildcard custom domains are not issued");
                    continue;
                }
                Err(e) => {
                    tracing::warn!("not ordering a certificate: {e}");
                    continue;
                }
            };
            if self.covered_by_wildcard(&n) {
                continue;
            }
            requests.insert(n.clone(), vec![n]);
        }
        let now = SystemTime::now();
        let mut st = self.state();
        let removed = st.sched.set_desired(requests.keys().cloned());
        for key in removed {
            if let Some(names) = st.requests.get(&key) {
                self.inner.resolver.remove(names);
            }
            self.forget_metrics(&mut st, &key);
        }
        for (key, names) in &requests {
            if st.requests.contains_key(key) {
                continue;
            }
            let usable = st.stored.get(key).filter(|c| {
                c.validity.not_after > now && names.iter().all(|n| c.names.contains(n))
            });
            if let Some(c) = usable.cloned() {
                match certified_key(&c.chain_pem, &c.key_pem) {
                    Ok(ck) => {
                        self.inner.resolver.install(names, ck);
                        st.sched.cert_installed(key, c.validity);
                        st.ari_pending.push(key.clone());
                        self.inner
                            .metrics
                            .not_after
                            .get_or_create(&vec![("name".into(), key.clone())])
                            .set(unix_secs(c.validity.not_after));
                        tracing::info!(name = %key, not_after = %rfc3339(c.validity.not_after),
                            "serving stored certificate");
                    }
                    Err(e) => tracing::warn!(name = %key, "stored certificate unusable: {e}"),
                }
            }
        }
        st.requests = requests;
        drop(st);
        self.inner.wake.notify_one();
    }

    fn covered_by_wildcard(&self, name: &str) -> bool {
        let Some(d) = &self.inner.farmer else {
            return false;
        };
        name == d
            || name
                .strip_suffix(d.as_str())
                .and_then(|p| p.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.'))
    }

    /// Orders a new certificate for `name` (a key: custom domain or `*.<domain>`) now,
    /// whatever its validity. Returns false when the name is not desired.
    pub fn renew_now(&self, name: &str) -> bool {
        let key = name.to_ascii_lowercase();
        let mut st = self.state();
        if !st.sched.is_desired(&key) {
            return false;
        }
        st.sched.force_renew(&key);
        drop(st);
        self.inner.wake.notify_one();
        true
    }

    /// The status of every desired certificate.
    pub fn status(&self) -> Vec<CertStatus> {
        self.status_at(SystemTime::now())
    }

    /// [`Self::status`] as of `now`.
    pub fn status_at(&self, now: SystemTime) -> Vec<CertStatus> {
        let st = self.state();
        st.requests
            .iter()
            .map(|(key, names)| {
                let v = st.sched.view(key);
                let validity = v.as_ref().and_then(|v| v.validity);
                CertStatus {
                    name: key.clone(),
                    names: names.clone(),
                    state: CertState::of(v.as_ref(), now),
                    not_before: validity.map(|v| rfc3339(v.not_before)),
                    not_after: validity.map(|v| rfc3339(v.not_after)),
                    renew_at: v.as_ref().and_then(|v| v.due).map(rfc3339),
                    failures: v.as_ref().map_or(0, |v| v.failures),
                    next_retry: v.as_ref().and_then(|v| v.retry_at).map(rfc3339),
                    last_error: v.and_then(|v| v.last_error),
                }
            })
            .collect()
    }

    /// Registers `meshgate_cert_*` metrics: orders by result, expiry time, consecutive
    /// failures, and the last error (problem type and detail as labels) per certificate.
    pub fn register_metrics(&self, registry: &mut Registry) {
        let m = &self.inner.metrics;
        registry.register(
            "meshgate_cert_orders",
            "ACME orders placed, by result",
            m.orders.clone(),
        );
        registry.register(
            "meshgate_cert_not_after_seconds",
            "Expiry (Unix time) of the certificate served for a name",
            m.not_after.clone(),
        );
        registry.register(
            "meshgate_cert_renewal_failures",
            "Consecutive failed orders for a name",
            m.failures.clone(),
        );
        registry.register(
            "meshgate_cert_last_error",
            "1 while the last order for a name failed; labels carry the ACME problem",
            m.last_error.clone(),
        );
    }

    fn forget_metrics(&self, st: &mut State, key: &str) {
        let name = vec![("name".to_string(), key.to_string())];
        self.inner.metrics.not_after.remove(&name);
        self.inner.metrics.failures.remove(&name);
        if let Some(labels) = st.error_labels.remove(key) {
            self.inner.metrics.last_error.remove(&labels);
        }
    }

    /// Connects (or registers) the ACME account now, to surface configuration errors such as
    /// a rejected contact at start. Orders connect lazily otherwise.
    pub async fn connect_account(&self) -> Result<(), CertError> {
        self.acme_client()
            .await
            .map(|_| ())
            .map_err(CertError::from)
    }

    /// The ACME account's URL at the server (connecting or registering it first).
    pub async fn account_id(&self) -> Result<String, CertError> {
        let client = self.acme_client().await.map_err(CertError::from)?;
        Ok(client.account_id().to_string())
    }

    async fn acme_client(&self) -> Result<Arc<AcmeClient>, IssueError> {
        let Directory::Acme(url) = &self.inner.directory else {
            return Err(IssueError::new("no ACME directory configured"));
        };
        let mut guard = self.inner.acme.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let client = Arc::new(
            AcmeClient::connect(
                url,
                &self.inner.contact,
                self.inner.config.acme.ca_root.as_deref(),
                &*self.inner.backend,
                self.inner.orders_placed.clone(),
            )
            .await?,
        );
        *guard = Some(client.clone());
        Ok(client)
    }

    /// Runs one scheduled order: takes the certificate's order lock (or reports its holder),
    /// serves a certificate another gateway stored meanwhile, or issues one and commits it
    /// under the lock (fenced: a lock lost meanwhile stores nothing). `replacing` is the
    /// certificate served when the order was scheduled (none for a first issuance).
    async fn order(
        &self,
        key: &str,
        names: &[String],
        replacing: Option<&StoredCert>,
    ) -> Result<OrderOutcome, IssueError> {
        let store_err = |e: CertError| IssueError::new(format!("order lock for {key}: {e}"));
        let guard = match self
            .inner
            .backend
            .lock_order(key)
            .await
            .map_err(store_err)?
        {
            LockAttempt::Busy { holder } => return Ok(OrderOutcome::Busy { holder }),
            LockAttempt::Acquired(guard) => guard,
        };
        let stored = self.inner.backend.load(key).await.map_err(|e| {
            IssueError::new(format!("reading the stored certificate for {key}: {e}"))
        })?;
        if let Some(c) = stored.filter(|c| newer_than(names, c, replacing)) {
            tracing::info!(name = %key, "certificate stored by another gateway; no order");
            return Ok(OrderOutcome::Stored(c));
        }
        let pem = self.issue(key, names, &*guard).await?;
        guard
            .commit(key, &pem.chain_pem, &pem.key_pem)
            .await
            .map_err(|e| IssueError::new(e.to_string()))?;
        Ok(OrderOutcome::Issued(pem))
    }

    /// Answers a challenge published by any gateway of the fleet (`present`), or stops
    /// answering it: HTTP-01 on :80, TLS-ALPN-01 on :443, DNS-01 in the challenge zone.
    pub async fn apply_challenge(
        &self,
        challenge: &Challenge,
        present: bool,
    ) -> Result<(), CertError> {
        apply_challenge(
            &self.inner.challenges,
            self.inner.dns_zone.as_ref(),
            challenge,
            present,
        )
        .await
    }

    /// Issues one certificate: DNS-01 for the farmer wildcard; the configured challenge for a
    /// custom domain, falling back to the other one when it fails. An unfinished order of a
    /// previous lock holder is resumed first.
    async fn issue(
        &self,
        key: &str,
        names: &[String],
        guard: &dyn OrderGuard,
    ) -> Result<IssuedPem, IssueError> {
        if let Some(ca) = &self.inner.devca {
            self.inner.orders_placed.fetch_add(1, Ordering::Relaxed);
            return ca
                .issue(names, crate::devca::LEAF_LIFETIME)
                .map_err(|e| IssueError::new(e.to_string()));
        }
        let client = self.acme_client().await?;
        // The certificate this order renews, when it covers one of the names.
        let replaces = self
            .state()
            .stored
            .get(key)
            .filter(|c| names.iter().any(|n| c.names.contains(n)))
            .map(|c| c.chain_pem.clone());
        let targets = ChallengeTargets {
            responder: &self.inner.challenges,
            dns: self.inner.dns_zone.as_ref(),
            guard,
        };
        let mut resume = guard.resume_url();
        let timeout = Duration::try_from_secs_f64(self.inner.config.acme.order_timeout_secs)
            .unwrap_or(Duration::from_secs(90));
        let plan = if key.starts_with("*.") {
            vec![ChallengeType::Dns01]
        } else {
            match self.inner.config.acme.challenge {
                CustomChallenge::Http01 => vec![ChallengeType::Http01, ChallengeType::TlsAlpn01],
                CustomChallenge::TlsAlpn01 => {
                    vec![ChallengeType::TlsAlpn01, ChallengeType::Http01]
                }
            }
        };
        let mut errors: Vec<IssueError> = Vec::new();
        for challenge in plan {
            match client
                .order(
                    names,
                    challenge.clone(),
                    &targets,
                    timeout,
                    replaces.as_deref(),
                    resume.take().as_deref(),
                )
                .await
            {
                Ok(pem) => return Ok(pem),
                Err(e) => {
                    tracing::warn!(name = %key, "{e}");
                    errors.push(e);
                }
            }
        }
        let problem_type = errors.iter().rev().find_map(|e| e.problem_type.clone());
        let message = errors
            .iter()
            .map(|e| e.message.as_str())
            .collect::<Vec<_>>()
            .join("; then ");
        Err(IssueError {
            message,
            problem_type,
        })
    }

    /// Spawns [`Self::run`] on the current tokio runtime.
    pub fn spawn(&self) -> tokio::task::JoinHandle<Result<(), CertError>> {
        let this = self.clone();
        tokio::spawn(async move { this.run().await })
    }

    /// Serves the DNS-01 zone on `listen`, retrying a failed bind with backoff (1 s doubling
    /// to 5 min); never returns, so the server lives as long as this future.
    async fn serve_dns_with_retry(zone: ChallengeZone, listen: SocketAddr) {
        let mut delay = DNS_RETRY_INITIAL;
        let _server: DnsServer = loop {
            match serve_dns(listen, vec![(zone.origin().clone(), zone.zone_handler())]).await {
                Ok(server) => break server,
                Err(e) => {
                    tracing::error!(
                        retry_in_secs = delay.as_secs(),
                        "{e}; DNS-01 (the farmer wildcard) waits, other certificates go on"
                    );
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(DNS_RETRY_MAX);
                }
            }
        };
        std::future::pending::<()>().await
    }

    /// The driver: serves DNS-01 (when `dns.listen` is set and a farmer domain configured;
    /// a failed bind is retried with backoff while other orders go on), places the orders the
    /// scheduler asks for, installs results, and sleeps until the next due time. Runs until
    /// its task is dropped/aborted.
    pub(crate) async fn run(&self) -> Result<(), CertError> {
        let dns = async {
            match (&self.inner.dns_zone, self.inner.config.dns.listen) {
                (Some(zone), Some(listen)) => {
                    Self::serve_dns_with_retry(zone.clone(), listen).await
                }
                _ => std::future::pending().await,
            }
        };
        tokio::pin!(dns);
        let mut changes = self.inner.backend.changes();
        let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
        loop {
            let now = SystemTime::now();
            let (actions, ari, next) = {
                let mut st = self.state();
                let actions = st.sched.poll(now);
                let ari = std::mem::take(&mut st.ari_pending);
                let ari: Vec<(String, String)> = ari
                    .into_iter()
                    .filter_map(|k| st.stored.get(&k).map(|c| (k, c.chain_pem.clone())))
                    .collect();
                (actions, ari, st.sched.next_wakeup())
            };
            for Action::PlaceOrder { key } in actions {
                let (names, replacing) = {
                    let st = self.state();
                    let names = st.requests.get(&key).cloned().unwrap_or_default();
                    (names, st.stored.get(&key).cloned())
                };
                let (this, tx) = (self.clone(), tx.clone());
                tokio::spawn(async move {
                    let result = this.order(&key, &names, replacing.as_ref()).await;
                    let _ = tx.send(Event::Issued { key, result });
                });
            }
            if matches!(self.inner.directory, Directory::Acme(_)) {
                for (key, chain) in ari {
                    let (this, tx) = (self.clone(), tx.clone());
                    tokio::spawn(async move { this.watch_renewal_info(key, chain, tx).await });
                }
            }
            let idle = next
                .map(|t| {
                    t.duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO)
                })
                .unwrap_or(MAX_IDLE)
                .min(MAX_IDLE);
            let changed = async {
                match changes.as_mut() {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut dns => {}
                Some(ev) = rx.recv() => self.handle(ev),
                open = changed => if open {
                    self.handle(Event::StoreChanged);
                } else {
                    changes = None;
                },
                _ = self.inner.wake.notified() => {}
                _ = tokio::time::sleep(idle) => {}
            }
        }
    }

    /// Fetches the ARI window of one certificate, again after each server-suggested delay
    /// (clamped to 1 h – 1 day), for as long as that certificate is the one in service. A
    /// failed lookup is retried with backoff; only a server without ARI ends it.
    async fn watch_renewal_info(
        &self,
        key: String,
        chain: String,
        tx: mpsc::UnboundedSender<Event>,
    ) {
        let lookup = || async {
            match self.acme_client().await {
                Ok(client) => client.renewal_window(&chain).await,
                Err(e) => AriLookup::Failed(e.message),
            }
        };
        let deliver = |start, end| {
            tx.send(Event::Window {
                key: key.clone(),
                start,
                end,
            })
            .is_ok()
        };
        let current = || {
            let st = self.state();
            st.sched.is_desired(&key) && st.stored.get(&key).is_some_and(|c| c.chain_pem == chain)
        };
        follow_renewal_info(lookup, deliver, current, ARI_RETRY).await;
    }

    fn handle(&self, ev: Event) {
        let now = SystemTime::now();
        let mut st = self.state();
        match ev {
            Event::Window { key, start, end } => {
                tracing::info!(name = %key, start = %rfc3339(start), end = %rfc3339(end),
                    "ACME renewal information window");
                st.sched.renewal_window(&key, start, end);
            }
            Event::StoreChanged => self.adopt_stored(&mut st),
            Event::Issued {
                key,
                result: Ok(OrderOutcome::Busy { holder }),
            } => {
                tracing::info!(name = %key, %holder, "another gateway is ordering this certificate");
                st.sched.order_deferred(&key, now + LOCK_BUSY_RETRY);
            }
            Event::Issued { key, result } => {
                let name = vec![("name".to_string(), key.clone())];
                let installed = result.and_then(|outcome| match outcome {
                    OrderOutcome::Issued(pem) => {
                        self.install(&mut st, &key, &pem.chain_pem, &pem.key_pem)
                    }
                    OrderOutcome::Stored(c) => {
                        self.install(&mut st, &key, &c.chain_pem, &c.key_pem)
                    }
                    OrderOutcome::Busy { .. } => unreachable!("handled above"),
                });
                match installed {
                    Ok(validity) => {
                        st.sched.order_succeeded(&key, validity);
                        self.inner
                            .metrics
                            .orders
                            .get_or_create(&vec![("result".into(), "success".into())])
                            .inc();
                        if st.sched.is_desired(&key) {
                            self.inner.metrics.failures.get_or_create(&name).set(0);
                            if let Some(labels) = st.error_labels.remove(&key) {
                                self.inner.metrics.last_error.remove(&labels);
                            }
                        }
                    }
                    Err(e) => {
                        let retry = st.sched.order_failed(&key, now, e.message.clone());
                        tracing::error!(name = %key, retry_at = %rfc3339(retry),
                            problem = e.problem_type.as_deref().unwrap_or("-"),
                            "certificate order failed: {}", e.message);
                        self.inner
                            .metrics
                            .orders
                            .get_or_create(&vec![("result".into(), "failure".into())])
                            .inc();
                        if st.sched.is_desired(&key) {
                            let failures = st.sched.view(&key).map_or(0, |v| v.failures);
                            self.inner
                                .metrics
                                .failures
                                .get_or_create(&name)
                                .set(failures as i64);
                            if let Some(old) = st.error_labels.remove(&key) {
                                self.inner.metrics.last_error.remove(&old);
                            }
                            let detail: String = e.message.chars().take(300).collect();
                            let labels = vec![
                                ("name".to_string(), key.clone()),
                                (
                                    "problem_type".to_string(),
                                    e.problem_type.clone().unwrap_or_default(),
                                ),
                                ("detail".to_string(), detail),
                            ];
                            self.inner.metrics.last_error.get_or_create(&labels).set(1);
                            st.error_labels.insert(key.clone(), labels);
                        }
                    }
                }
            }
        }
    }

    /// Serves certificates the backend holds that are newer than those served (committed by
    /// another gateway): no order is placed for them, and renewal is rescheduled.
    fn adopt_stored(&self, st: &mut State) {
        let desired: Vec<(String, Vec<String>)> = st
            .requests
            .iter()
            .filter(|(k, _)| st.sched.is_desired(k))
            .map(|(k, n)| (k.clone(), n.clone()))
            .collect();
        let now = SystemTime::now();
        for c in self.inner.backend.load_all() {
            let c = match c {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("certificate store: {e}");
                    continue;
                }
            };
            let Some((key, names)) = desired.iter().find(|(k, _)| *k == c.key) else {
                continue;
            };
            let newer = c.validity.not_after > now
                && names.iter().all(|n| c.names.contains(n))
                && st.stored.get(key).is_none_or(|s| {
                    s.chain_pem != c.chain_pem && c.validity.not_before >= s.validity.not_before
                });
            if !newer {
                continue;
            }
            match self.install(st, key, &c.chain_pem, &c.key_pem) {
                Ok(validity) => {
                    st.sched.cert_installed(key, validity);
                    tracing::info!(name = %key, "serving the certificate another gateway obtained");
                }
                Err(e) => tracing::warn!(name = %key, "{e}"),
            }
        }
    }

    /// Swaps a certificate (already in the backend) into the resolver, when still desired.
    fn install(
        &self,
        st: &mut State,
        key: &str,
        chain_pem: &str,
        key_pem: &str,
    ) -> Result<Validity, IssueError> {
        let bad = |e: CertError| IssueError::new(format!("certificate for {key}: {e}"));
        let (validity, names) = leaf_info(chain_pem).map_err(bad)?;
        let ck = certified_key(chain_pem, key_pem).map_err(bad)?;
        if let Some(want) = st.requests.get(key).filter(|_| st.sched.is_desired(key)) {
            self.inner.resolver.install(want, ck);
            self.inner
                .metrics
                .not_after
                .get_or_create(&vec![("name".into(), key.to_string())])
                .set(unix_secs(validity.not_after));
        }
        st.stored.insert(
            key.to_string(),
            StoredCert {
                key: key.to_string(),
                names,
                chain_pem: chain_pem.to_string(),
                key_pem: key_pem.to_string(),
                validity,
            },
        );
        st.ari_pending.push(key.to_string());
        tracing::info!(name = %key, not_after = %rfc3339(validity.not_after), "certificate installed");
        Ok(validity)
    }
}

/// Asks `lookup` for the ARI window until it reports ARI unsupported or `current` says the
/// certificate is no longer in service: each window goes to `deliver` (false: stop) and the
/// next lookup follows the server's delay; failures are retried after `retry.0` doubling up
/// to `retry.1`.
async fn follow_renewal_info<L, F>(
    mut lookup: L,
    mut deliver: impl FnMut(SystemTime, SystemTime) -> bool,
    mut current: impl FnMut() -> bool,
    retry: (Duration, Duration),
) where
    L: FnMut() -> F,
    F: std::future::Future<Output = AriLookup>,
{
    let mut failures: u32 = 0;
    loop {
        let delay = match lookup().await {
            AriLookup::Window {
                start,
                end,
                retry_after,
            } => {
                failures = 0;
                if !deliver(start, end) {
                    return;
                }
                retry_after.clamp(Duration::from_secs(3600), Duration::from_secs(86400))
            }
            AriLookup::Unsupported => return, // the 2/3 rule stands
            AriLookup::Failed(e) => {
                let delay = retry.0.saturating_mul(1 << failures.min(20)).min(retry.1);
                failures = failures.saturating_add(1);
                tracing::warn!(
                    retry_in_secs = delay.as_secs_f64(),
                    "ARI lookup failed: {e}"
                );
                delay
            }
        };
        tokio::time::sleep(delay).await;
        if !current() {
            return;
        }
    }
}

/// True when `c` covers `names`, is still valid and is not older than `replacing`, the
/// certificate served when the order was scheduled: another gateway issued or renewed it
/// since. Compared with that one, not with the one served now: a renewal adopted from the
/// store while this order waited for the lock is already served, and is still no reason to
/// order again.
fn newer_than(names: &[String], c: &StoredCert, replacing: Option<&StoredCert>) -> bool {
    let now = SystemTime::now();
    if c.validity.not_after <= now || !names.iter().all(|n| c.names.contains(n)) {
        return false;
    }
    match replacing {
        None => true,
        Some(old) => {
            old.chain_pem != c.chain_pem && c.validity.not_before >= old.validity.not_before
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn cert(chain: &str, issued_secs_ago: u64) -> StoredCert {
        let not_before = SystemTime::now() - Duration::from_secs(issued_secs_ago);
        StoredCert {
            key: "renew.test".into(),
            names: vec!["renew.test".into()],
            chain_pem: chain.into(),
            key_pem: String::new(),
            validity: Validity {
                not_before,
                not_after: not_before + Duration::from_secs(3600),
            },
        }
    }

    /// A full test run once saw a third order after a fleet renewal: a gateway's order,
    /// scheduled before the renewal, took the lock after the renewed certificate had been
    /// stored and adopted, and compared the store with what it now served (the same
    /// certificate), so it ordered.
    #[test]
    fn an_order_skips_a_certificate_stored_since_it_was_scheduled() {
        let names = ["renew.test".to_string()];
        let old = cert("old", 600);
        let renewed = cert("renewed", 1);
        // Renewed by another gateway since the order was scheduled: no order, even though
        // this gateway already serves it.
        assert!(newer_than(&names, &renewed, Some(&old)));
        // The store still holds the certificate the order replaces: order.
        assert!(!newer_than(&names, &old, Some(&old)));
        // A stored certificate older than the one being replaced is no substitute.
        assert!(!newer_than(&names, &old, Some(&renewed)));
        // First issuance: any valid stored certificate for the names will do.
        assert!(newer_than(&names, &renewed, None));
        // Not for other names, and not once expired.
        assert!(!newer_than(&["other.test".to_string()], &renewed, None));
        let mut expired = cert("expired", 7200);
        expired.validity.not_after = SystemTime::now() - Duration::from_secs(1);
        assert!(!newer_than(&names, &expired, None));
    }

    #[tokio::test]
    async fn failed_ari_lookups_are_retried_until_a_window_arrives() {
        let calls = AtomicU32::new(0);
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let end = start + Duration::from_secs(60);
        let lookup = || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0 | 1 => AriLookup::Failed("503 Service Unavailable".into()),
                    _ => AriLookup::Window {
                        start,
                        end,
                        retry_after: Duration::ZERO,
                    },
                }
            }
        };
        let mut windows = Vec::new();
        let retry = (Duration::from_millis(5), Duration::from_millis(20));
        tokio::time::timeout(
            Duration::from_secs(10),
            follow_renewal_info(
                lookup,
                |s, e| {
                    windows.push((s, e));
                    false // stop after the first window
                },
                || true,
                retry,
            ),
        )
        .await
        .expect("a window arrives after the failures");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(windows, vec![(start, end)]);
    }

    #[tokio::test]
    async fn unsupported_ari_stops_the_lookups() {
        let calls = AtomicU32::new(0);
        let lookup = || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { AriLookup::Unsupported }
        };
        let retry = (Duration::from_millis(1), Duration::from_millis(1));
        follow_renewal_info(lookup, |_, _| true, || true, retry).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
