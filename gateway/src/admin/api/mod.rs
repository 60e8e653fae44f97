//! The reservations admin API (`/v1/…`, JSON over HTTP), described in `docs/admin-api.yaml`.
//!
//! The farmer's admin token creates deployer tokens; a deployer creates, lists, updates and
//! deletes only its own name and domain reservations. The handler is mounted by the admin
//! listener (which also serves `/metrics`); [`serve`] runs it alone on a listener.

mod body;
mod error;
mod reservations;
mod tokens;

pub use error::ApiError;

use bytes::Bytes;
use error::json_response;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use meshgate_reservations::consent::{self, ConsentSource};
use meshgate_reservations::counters::Counters;
use meshgate_reservations::reservation::{Policy, validate_owner};
use meshgate_reservations::store::{ReservationStore, SharedStore};
use meshgate_reservations::token::{AdminToken, parse_token};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use std::net::IpAddr;
use std::sync::Arc;

/// What the API needs besides the store and the admin token.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Reserved labels and backend rules.
    pub policy: Policy,
    /// The gateway's public addresses, shown to deployers as an alternative to a CNAME.
    pub gateway_addrs: Vec<IpAddr>,
    /// Most reservations one deployer may hold (`reservations.max_per_owner`).
    pub max_per_owner: usize,
    /// Asks overlay nodes for their consent; `None` (no overlay node): overlay backends are
    /// refused, since no node can be asked.
    pub consent: Option<ConsentCheck>,
    /// Shared with the verifier and the consent checker; exported on `/metrics`.
    pub counters: Arc<Counters>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            policy: Policy::default(),
            gateway_addrs: Vec::new(),
            max_per_owner: 100,
            consent: None,
            counters: Arc::default(),
        }
    }
}

/// How the API asks nodes for consent when a reservation is made or its backends change (the
/// periodic re-checks are [`consent::Checker`]'s).
#[derive(Clone)]
pub struct ConsentCheck {
    pub source: Arc<dyn ConsentSource>,
    pub rules: consent::Rules,
}

impl std::fmt::Debug for ConsentCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsentCheck")
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

/// What the gateway serving the API knows about a host now, for `GET /v1/routes`: whether it
/// is routed, its recent traffic and its certificate (a JSON object merged into the entry).
pub trait HostActivity: Send + Sync {
    fn describe(&self, host: &str) -> serde_json::Value;
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Caller {
    Admin,
    Deployer(String),
}

impl Caller {
    fn may_act_for(&self, owner: &str) -> bool {
        match self {
            Caller::Admin => true,
            Caller::Deployer(me) => me == owner,
        }
    }
}

/// The admin API handler.
pub struct Api {
    store: SharedStore,
    admin: AdminToken,
    cfg: ApiConfig,
}

impl Api {
    pub fn new(store: SharedStore, admin: AdminToken, cfg: ApiConfig) -> Self {
        Api { store, admin, cfg }
    }

    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    /// The reservation counters as `meshgate_reservations_*_total`, read at scrape time.
    pub fn metrics(&self) -> Box<dyn Collector> {
        Box::new(CountersCollector(self.cfg.counters.clone()))
    }

    /// Handles one request under `/v1/`; anything else is a JSON 404.
    pub async fn handle(&self, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        self.handle_request(req).await
    }

    /// [`Api::handle`] for any request body type.
    pub async fn handle_request<B>(&self, req: Request<B>) -> Response<Full<Bytes>>
    where
        B: hyper::body::Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.handle_with(req, None).await
    }

    /// [`Api::handle_request`] with what the serving gateway knows about each host, shown by
    /// `GET /v1/routes` (without it, that lists the hosts only).
    pub async fn handle_with<B>(
        &self,
        req: Request<B>,
        activity: Option<&dyn HostActivity>,
    ) -> Response<Full<Bytes>>
    where
        B: hyper::body::Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        match self.dispatch(req, activity).await {
            Ok(resp) => resp,
            Err(e) => e.into_response(),
        }
    }

    async fn dispatch<B>(
        &self,
        req: Request<B>,
        activity: Option<&dyn HostActivity>,
    ) -> Result<Response<Full<Bytes>>, ApiError>
    where
        B: hyper::body::Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = req.uri().path().to_string();
        let Some(rest) = path.strip_prefix("/v1/") else {
            return Err(ApiError::not_found("path", format!("no API at {path}")));
        };
        let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        let method = req.method().clone();
        // `?owner=` picks one deployer's claim on a domain (the admin's choice; a deployer
        // always addresses its own).
        let owner: Option<String> = req.uri().query().and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("owner="))
                .map(str::to_string)
        });
        let owner = owner.as_deref();
        if let Some(o) = owner {
            validate_owner("owner", o)?;
        }
        let Some(allowed) = allowed_methods(&segments) else {
            return Err(ApiError::not_found("path", format!("no API at {path}")));
        };
        if !allowed.split(", ").any(|m| m == method.as_str()) {
            // RFC 9110 §15.5.6: a 405 names the methods the resource supports.
            let mut resp = ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method",
                format!("{method} is not allowed on {path}; use {allowed}"),
            )
            .into_response();
            resp.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static(allowed));
            return Ok(resp);
        }
        let caller = self.authenticate(&req).await?;
        let body = req.into_body();
        use reservations::Which::{Domains, Names};
        match (segments.as_slice(), &method) {
            (["whoami"], &Method::GET) => Ok(whoami(&caller)),
            (["routes"], &Method::GET) => reservations::routes(self, &caller, activity).await,
            (["tokens"], &Method::POST) => tokens::create(self, &caller, body).await,
            (["tokens"], &Method::GET) => tokens::list(self, &caller).await,
            (["tokens", id], &Method::DELETE) => tokens::delete(self, &caller, id).await,
            (["names"], &Method::GET) => reservations::list(self, &caller, Names).await,
            (["names"], &Method::POST) => reservations::create(self, &caller, Names, body).await,
            (["names", n], &Method::GET) => reservations::get(self, &caller, Names, n, owner).await,
            (["names", n], &Method::PUT) => {
                reservations::update(self, &caller, Names, n, owner, body).await
            }
            (["names", n], &Method::DELETE) => {
                reservations::delete(self, &caller, Names, n, owner).await
            }
            (["domains"], &Method::GET) => reservations::list(self, &caller, Domains).await,
            (["domains"], &Method::POST) => {
                reservations::create(self, &caller, Domains, body).await
            }
            (["domains", d], &Method::GET) => {
                reservations::get(self, &caller, Domains, d, owner).await
            }
            (["domains", d], &Method::PUT) => {
                reservations::update(self, &caller, Domains, d, owner, body).await
            }
            (["domains", d], &Method::DELETE) => {
                reservations::delete(self, &caller, Domains, d, owner).await
            }
            (["domains", d, "verify"], &Method::POST) => {
                reservations::verify_now(self, &caller, d, owner).await
            }
            // `allowed_methods` answered every other method and path above.
            _ => Err(ApiError::not_found("path", format!("no API at {path}"))),
        }
    }

    /// `Authorization: Bearer <token>`: the admin token, or a stored deployer token.
    async fn authenticate<B>(&self, req: &Request<B>) -> Result<Caller, ApiError> {
        let Some(value) = req.headers().get(header::AUTHORIZATION) else {
            return Err(ApiError::unauthorized(
                "missing `Authorization: Bearer <token>` header",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| ApiError::unauthorized("expected `Authorization: Bearer <token>`"))?;
        if self.admin.matches(token) {
            return Ok(Caller::Admin);
        }
        let invalid = || ApiError::unauthorized("unknown or revoked token");
        let parsed = parse_token(token).ok_or_else(invalid)?;
        let id = parsed.id.to_string();
        let stored = self.blocking(move |s| s.token(&id)).await??;
        match stored {
            Some(t) if parsed.matches(&t.hash) => Ok(Caller::Deployer(t.owner)),
            _ => Err(invalid()),
        }
    }

    /// Runs a store call off the async threads (redb commits fsync).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn ReservationStore) -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&*store))
            .await
            .map_err(|e| {
                tracing::error!("admin API store task failed: {e}");
                ApiError::internal()
            })
    }
}

/// Exports [`Counters`] to Prometheus.
#[derive(Debug)]
struct CountersCollector(Arc<Counters>);

impl Collector for CountersCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, value) in self.0.snapshot() {
            let metric = ConstCounter::new(value);
            metric.encode(encoder.encode_descriptor(
                &format!("meshgate_reservations_{name}"),
                help,
                None,
                metric.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

/// The methods a path supports (the `Allow` of its 405), or `None` when there is no such path.
fn allowed_methods(segments: &[&str]) -> Option<&'static str> {
    Some(match segments {
        ["whoami"] | ["routes"] => "GET",
        ["tokens"] | ["names"] | ["domains"] => "GET, POST",
        ["tokens", _] => "DELETE",
        ["names", _] | ["domains", _] => "GET, PUT, DELETE",
        ["domains", _, "verify"] => "POST",
        _ => return None,
    })
}

fn whoami(caller: &Caller) -> Response<Full<Bytes>> {
    let body = match caller {
        Caller::Admin => serde_json::json!({"role": "admin"}),
        Caller::Deployer(owner) => serde_json::json!({"role": "deployer", "owner": owner}),
    };
    json_response(StatusCode::OK, &body)
}

/// Serves the API alone on `listener` (HTTP/1.1) until this future is dropped, which also
/// closes its connections. The gateway's admin listener mounts [`handler`] instead, next to
/// `/metrics`.
pub async fn serve(api: Arc<Api>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => accepted?.0,
            Some(_) = connections.join_next() => continue,
        };
        let api = api.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, std::convert::Infallible>(api.handle(req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("admin API connection: {e}");
            }
        });
    }
}
