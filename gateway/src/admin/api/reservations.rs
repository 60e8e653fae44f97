//! `/v1/names` and `/v1/domains`: a deployer's reservations.

use super::body::read_object;
use super::error::{json_response, no_content};
use super::{Api, ApiError, Caller, HostActivity};
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use meshgate_config::route::Mode;
use meshgate_reservations::clock::{now_unix, now_unix_ms};
use meshgate_reservations::consent;
use meshgate_reservations::reservation::{
    ConsentState, FieldError, Key, Kind, Options, Reservation, challenge_name, needs_consent,
    validate_backends, validate_fqdn, validate_name, validate_options, validate_owner,
};
use meshgate_reservations::store::{ReservationStoreExt, StoreError};
use serde_json::Value;

/// The owner of a reservation the admin token makes without naming one.
pub(crate) const FARMER_OWNER: &str = "farmer";

/// Which collection a request addresses.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Which {
    Names,
    Domains,
}

impl Which {
    fn kind(self) -> Kind {
        match self {
            Which::Names => Kind::Name,
            Which::Domains => Kind::Domain,
        }
    }
    /// The body field and path parameter naming the reservation.
    fn field(self) -> &'static str {
        match self {
            Which::Names => "name",
            Which::Domains => "fqdn",
        }
    }
    fn collection(self) -> &'static str {
        match self {
            Which::Names => "names",
            Which::Domains => "domains",
        }
    }
}

/// The reservation a path parameter addresses (lowercase, no trailing dot): the name, or a
/// claim on the domain: a deployer's own, or for the admin the one `?owner=` names, else the
/// domain's only claim or the one that holds it.
async fn resolve(
    api: &Api,
    caller: &Caller,
    which: Which,
    raw: &str,
    owner: Option<&str>,
) -> Result<Key, ApiError> {
    let name = raw.trim_end_matches('.').to_ascii_lowercase();
    match (which, caller, owner) {
        (Which::Names, ..) => Ok(Key::name(name)),
        (Which::Domains, Caller::Deployer(me), _) => Ok(Key::domain(name, me.clone())),
        (Which::Domains, Caller::Admin, Some(o)) => Ok(Key::domain(name, o)),
        (Which::Domains, Caller::Admin, None) => {
            let fqdn = name.clone();
            let claims = api.blocking(move |s| s.domain_claims(&fqdn)).await??;
            let holder = claims.iter().find(|r| r.status.is_verified());
            match (holder, claims.as_slice()) {
                (Some(r), _) | (None, [r]) => Ok(r.key()),
                (None, []) => Ok(Key::domain(name, "")),
                (None, _) => Err(ApiError::conflict(
                    "owner",
                    format!(
                        "{} deployers claim `{name}` and none has proved it; add `?owner=<id>`",
                        claims.len()
                    ),
                )),
            }
        }
    }
}

/// The consent entries for `backends` of the reservation `r` would become, each granted by
/// its node now, or the refusal naming the first backend whose node does not consent.
async fn consent_for(
    api: &Api,
    r: &Reservation,
) -> Result<Vec<meshgate_reservations::reservation::BackendConsent>, ApiError> {
    let needing: Vec<usize> = (0..r.backends.len())
        .filter(|i| needs_consent(r.backends[*i].ip()))
        .collect();
    if needing.is_empty() {
        return Ok(Vec::new());
    }
    let counters = &api.cfg.counters;
    let Some(check) = &api.cfg.consent else {
        counters.add(&counters.refused_consent);
        return Err(ApiError::forbidden(
            format!("backends[{}]", needing[0]),
            format!(
                "{} is an overlay address, and this gateway has no overlay node to ask that \
                 node's consent",
                r.backends[needing[0]].ip()
            ),
        ));
    };
    let answers = consent::ask_all(&*check.source, consent::nodes_of([r]), counters).await;
    let mut probe = r.clone();
    let farmer = api.store.farmer_domain();
    consent::apply(&mut probe, &answers, farmer, now_unix_ms(), &check.rules);
    for c in &probe.consent {
        if c.state != ConsentState::Granted {
            let i = r.backends.iter().position(|b| *b == c.backend).unwrap_or(0);
            counters.add(&counters.refused_consent);
            return Err(ApiError::forbidden(
                format!("backends[{i}]"),
                c.reason.clone().unwrap_or_else(|| "no consent".into()),
            ));
        }
    }
    Ok(probe.consent)
}

/// Counts a validation refusal that hit one of the limits the operator watches.
fn count_refusal(api: &Api, e: &FieldError) {
    let c = &api.cfg.counters;
    // The reasons are written in `meshgate_reservations::reservation`.
    if e.reason.contains("is reserved by the gateway operator") {
        c.add(&c.refused_reserved);
    } else if e.reason.contains("mixes scripts") {
        c.add(&c.refused_mixed_script);
    }
}

/// The JSON shape of a reservation: the stored record plus its host and, for domains, the
/// DNS records the owner must publish.
fn view(api: &Api, r: &Reservation) -> Value {
    let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
    let farmer = api.store.farmer_domain();
    if let Value::Object(map) = &mut v {
        map.insert("host".into(), Value::String(r.host(farmer)));
        match r.kind {
            Kind::Name => {
                map.remove("verification");
            }
            Kind::Domain => {
                map.insert(
                    "dns".into(),
                    serde_json::json!({
                        "challenge": {
                            "name": challenge_name(&r.name),
                            "type": "TXT",
                            "value": api.store.challenge_token(&r.owner, &r.name),
                        },
                        "pointing": {
                            "cname": farmer,
                            "addresses": api.cfg.gateway_addrs,
                        },
                    }),
                );
            }
        }
    }
    v
}

fn forbidden(which: Which, key: &Key) -> ApiError {
    ApiError::forbidden(
        which.field(),
        format!("`{}` belongs to another deployer", key.name),
    )
}

fn not_found(which: Which, key: &Key) -> ApiError {
    let whose = match &key.owner {
        Some(o) if !o.is_empty() => format!(" claimed by `{o}`"),
        _ => String::new(),
    };
    ApiError::not_found(
        which.field(),
        format!("no {} reservation `{}`{whose}", key.kind.as_str(), key.name),
    )
}

/// `GET /v1/{names|domains}`: the caller's reservations (all of them for the admin).
pub(crate) async fn list(
    api: &Api,
    caller: &Caller,
    which: Which,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let owner = match caller {
        Caller::Admin => None,
        Caller::Deployer(me) => Some(me.clone()),
    };
    let kind = which.kind();
    let items = api
        .blocking(move |s| s.list(owner.as_deref(), Some(kind)))
        .await??;
    let items: Vec<Value> = items.iter().map(|r| view(api, r)).collect();
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ which.collection(): items }),
    ))
}

/// `POST /v1/{names|domains}`.
pub(crate) async fn create<B>(
    api: &Api,
    caller: &Caller,
    which: Which,
    body: B,
) -> Result<Response<Full<Bytes>>, ApiError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut obj = read_object(body).await?;
    let field = which.field();
    let raw = obj.string(field)?;
    let backends = obj
        .opt_strings("backends")?
        .ok_or_else(|| ApiError::bad_request("backends", "is required"))?;
    let mode = obj.opt::<Mode>("mode")?.unwrap_or_default();
    let options = obj.opt::<Options>("options")?.unwrap_or_default();
    let owner_field = obj.opt_string("owner")?;
    obj.finish()?;

    let owner = match (caller, owner_field) {
        (Caller::Admin, Some(o)) => {
            validate_owner("owner", &o)?;
            o
        }
        // The farmer's own reservation: the schema lets the admin leave the owner out.
        (Caller::Admin, None) => FARMER_OWNER.to_string(),
        (Caller::Deployer(me), Some(o)) if o != *me => {
            return Err(ApiError::forbidden(
                "owner",
                "a deployer reserves only for itself",
            ));
        }
        (Caller::Deployer(me), _) => me.clone(),
    };
    let farmer = api.store.farmer_domain();
    let policy = &api.cfg.policy;
    let name = match which {
        Which::Names => validate_name(field, &raw, farmer, policy),
        Which::Domains => validate_fqdn(field, &raw, farmer),
    }
    .inspect_err(|e| count_refusal(api, e))?;
    let backends = validate_backends("backends", &backends, policy)?;
    validate_options("options", &options)?;
    let key = match which {
        Which::Names => Key::name(name),
        Which::Domains => Key::domain(name, owner.clone()),
    };
    let mut r = Reservation::new(key.clone(), &owner, backends, mode, options, now_unix());
    r.consent = consent_for(api, &r).await?;
    let stored = r.clone();
    let max = api.cfg.max_per_owner;
    match api.blocking(move |s| s.create(&stored, max)).await? {
        Ok(()) => {}
        Err(StoreError::Conflict { .. }) if which.kind() == Kind::Domain => {
            return Err(ApiError::conflict(
                field,
                format!("you already claim `{}`", key.name),
            ));
        }
        Err(StoreError::Conflict { .. }) => {
            return Err(ApiError::conflict(
                field,
                format!("`{}` is already reserved", key.name),
            ));
        }
        Err(StoreError::Held { .. }) => {
            return Err(ApiError::conflict(
                field,
                format!(
                    "`{}` is held by another deployer whose DNS proof holds; it is released \
                     when that proof fails for longer than the grace period",
                    key.name
                ),
            ));
        }
        Err(StoreError::Quota { owner, limit }) => {
            let c = &api.cfg.counters;
            c.add(&c.refused_quota);
            return Err(ApiError::forbidden(
                "owner",
                format!(
                    "`{owner}` already holds {limit} reservations, the most this gateway allows \
                     (reservations.max_per_owner); delete one first"
                ),
            ));
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!(%owner, reservation = %key, "reservation created");
    if which.kind() == Kind::Domain {
        api.store.request_verification();
    }
    Ok(json_response(StatusCode::CREATED, &view(api, &r)))
}

/// `GET /v1/{names|domains}/{name}`.
pub(crate) async fn get(
    api: &Api,
    caller: &Caller,
    which: Which,
    raw: &str,
    owner: Option<&str>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let key = resolve(api, caller, which, raw, owner).await?;
    let k = key.clone();
    let Some(r) = api.blocking(move |s| s.get(&k)).await?? else {
        return Err(not_found(which, &key));
    };
    if !caller.may_act_for(&r.owner) {
        return Err(forbidden(which, &key));
    }
    Ok(json_response(StatusCode::OK, &view(api, &r)))
}

/// `PUT /v1/{names|domains}/{name}`: replaces the given fields of `backends`, `mode`,
/// `options`; the others stay.
pub(crate) async fn update<B>(
    api: &Api,
    caller: &Caller,
    which: Which,
    raw: &str,
    owner: Option<&str>,
    body: B,
) -> Result<Response<Full<Bytes>>, ApiError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let key = resolve(api, caller, which, raw, owner).await?;
    let mut obj = read_object(body).await?;
    let backends = obj.opt_strings("backends")?;
    let mode = obj.opt::<Mode>("mode")?;
    let options = obj.opt::<Options>("options")?;
    obj.finish()?;
    if backends.is_none() && mode.is_none() && options.is_none() {
        return Err(ApiError::bad_request(
            "body",
            "nothing to change: give `backends`, `mode` or `options`",
        ));
    }
    let backends = backends
        .map(|b| validate_backends("backends", &b, &api.cfg.policy))
        .transpose()?;
    if let Some(o) = &options {
        validate_options("options", o)?;
    }
    // New backends need their nodes' consent before the change is accepted.
    let consent = match &backends {
        Some(b) => {
            let k = key.clone();
            let Some(mut current) = api.blocking(move |s| s.get(&k)).await?? else {
                return Err(not_found(which, &key));
            };
            if !caller.may_act_for(&current.owner) {
                return Err(forbidden(which, &key));
            }
            current.backends.clone_from(b);
            Some(consent_for(api, &current).await?)
        }
        None => None,
    };
    let k = key.clone();
    let who = caller.clone();
    let (fwhich, fkey) = (which, key.clone());
    let updated = api
        .blocking(move |s| {
            s.update(&k, move |r| {
                if !who.may_act_for(&r.owner) {
                    return Err(forbidden(fwhich, &fkey));
                }
                if let Some(b) = &backends {
                    r.backends.clone_from(b);
                }
                if let Some(c) = &consent {
                    r.consent.clone_from(c);
                }
                if let Some(m) = mode {
                    r.mode = m;
                }
                if let Some(o) = &options {
                    r.options.clone_from(o);
                }
                r.updated_at = now_unix();
                Ok::<(), ApiError>(())
            })
        })
        .await??;
    match updated {
        Some(r) => {
            tracing::info!(reservation = %key, "reservation updated");
            Ok(json_response(StatusCode::OK, &view(api, &r)))
        }
        None => Err(not_found(which, &key)),
    }
}

/// `DELETE /v1/{names|domains}/{name}`.
pub(crate) async fn delete(
    api: &Api,
    caller: &Caller,
    which: Which,
    raw: &str,
    owner: Option<&str>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let key = resolve(api, caller, which, raw, owner).await?;
    let k = key.clone();
    let who = caller.clone();
    let fkey = key.clone();
    let removed = api
        .blocking(move |s| {
            s.delete(&k, move |r| {
                if who.may_act_for(&r.owner) {
                    Ok(())
                } else {
                    Err(forbidden(which, &fkey))
                }
            })
        })
        .await??;
    match removed {
        Some(_) => {
            tracing::info!(reservation = %key, "reservation deleted");
            Ok(no_content())
        }
        None => Err(not_found(which, &key)),
    }
}

/// `POST /v1/domains/{fqdn}/verify`: check the DNS proof now rather than at the next round.
pub(crate) async fn verify_now(
    api: &Api,
    caller: &Caller,
    raw: &str,
    owner: Option<&str>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let which = Which::Domains;
    let key = resolve(api, caller, which, raw, owner).await?;
    let k = key.clone();
    let Some(r) = api.blocking(move |s| s.get(&k)).await?? else {
        return Err(not_found(which, &key));
    };
    if !caller.may_act_for(&r.owner) {
        return Err(forbidden(which, &key));
    }
    api.store.request_verification();
    Ok(json_response(StatusCode::ACCEPTED, &view(api, &r)))
}

/// `GET /v1/routes`: the host of each of the caller's reservations (every one for the admin),
/// with its state and what the gateway knows of it: served or not, recent requests and
/// errors, certificate.
pub(crate) async fn routes(
    api: &Api,
    caller: &Caller,
    activity: Option<&dyn HostActivity>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let owner = match caller {
        Caller::Admin => None,
        Caller::Deployer(me) => Some(me.clone()),
    };
    let items = api
        .blocking(move |s| s.list(owner.as_deref(), None))
        .await??;
    let farmer = api.store.farmer_domain();
    let routes: Vec<Value> = items
        .iter()
        .map(|r| {
            let host = r.host(farmer);
            let mut v = serde_json::json!({
                "kind": r.kind,
                "name": r.name,
                "owner": r.owner,
                "host": host,
                "state": r.status,
            });
            if let (Some(a), Value::Object(map)) = (activity, &mut v)
                && let Value::Object(more) = a.describe(&host)
            {
                map.extend(more);
            }
            v
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "routes": routes }),
    ))
}
