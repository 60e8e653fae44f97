//! `meshgate reserve`: a client of the gateway's reservations admin API (`/v1/…`).

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Subcommand, ValueEnum};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Base URL of the gateway's reservations API listener (`[api] listen`).
    #[arg(
        long = "api",
        alias = "admin",
        env = "MESHGATE_API",
        default_value = "http://127.0.0.1:9091",
        global = true
    )]
    admin: String,
    /// PEM CA certificate(s) to trust for an `https://` API URL (default: the system's).
    #[arg(long, env = "MESHGATE_CACERT", value_name = "PATH", global = true)]
    cacert: Option<PathBuf>,
    /// Deployer token (or the farmer's admin token).
    #[arg(long, env = "MESHGATE_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Print the API's JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Reserve `<name>.<farmer domain>`.
    Name {
        name: String,
        #[command(flatten)]
        spec: Spec,
    },
    /// Reserve a custom domain (activated once its DNS proof holds).
    Domain {
        fqdn: String,
        #[command(flatten)]
        spec: Spec,
    },
    /// List your reservations.
    List {
        /// Only names.
        #[arg(long, conflicts_with = "domains")]
        names: bool,
        /// Only domains.
        #[arg(long)]
        domains: bool,
    },
    /// Show one reservation (for domains: the DNS records to publish).
    Show { target: String },
    /// Change a reservation's backends, mode or options.
    Update {
        target: String,
        #[arg(long = "backend", value_name = "ADDR:PORT")]
        backends: Vec<String>,
        #[arg(long, value_enum)]
        mode: Option<ModeArg>,
        #[command(flatten)]
        options: UpdateFlags,
    },
    /// Delete a reservation (a name, or a domain).
    Delete { target: String },
    /// Ask the gateway to check a domain's DNS proof now.
    Verify { fqdn: String },
    /// Create a deployer token (needs the farmer's admin token).
    Token { owner: String },
}

#[derive(clap::Args, Debug)]
struct Spec {
    /// Backend `ip:port` (IPv6 as `[addr]:port`); repeat for several.
    #[arg(long = "backend", value_name = "ADDR:PORT", required = true)]
    backends: Vec<String>,
    #[arg(long, value_enum, default_value = "terminate")]
    mode: ModeArg,
    #[command(flatten)]
    options: OptionFlags,
    /// Owner, when reserving with the admin token.
    #[arg(long)]
    owner: Option<String>,
}

#[derive(clap::Args, Debug)]
struct OptionFlags {
    /// Serve plain HTTP on :80 instead of redirecting it to HTTPS.
    #[arg(long)]
    allow_plain_http: bool,
    /// Keep each client on one backend.
    #[arg(long)]
    sticky: bool,
}

impl OptionFlags {
    fn json(&self) -> Value {
        json!({
            "redirect_https": !self.allow_plain_http,
            "allow_plain_http": self.allow_plain_http,
            "sticky": self.sticky,
        })
    }
}

/// Option changes for `update`; options not mentioned keep their current value.
#[derive(clap::Args, Debug)]
struct UpdateFlags {
    /// Serve plain HTTP on :80 instead of redirecting it to HTTPS.
    #[arg(long, conflicts_with = "no_plain_http")]
    allow_plain_http: bool,
    /// Redirect plain HTTP on :80 to HTTPS again.
    #[arg(long)]
    no_plain_http: bool,
    /// Keep each client on one backend.
    #[arg(long, conflicts_with = "no_sticky")]
    sticky: bool,
    /// Stop keeping clients on one backend.
    #[arg(long)]
    no_sticky: bool,
}

impl UpdateFlags {
    /// The full options object: `current` (the reservation's `options`) with the flags applied,
    /// or `None` when no option flag was given.
    fn apply(&self, current: &Value) -> Option<Value> {
        let plain = match (self.allow_plain_http, self.no_plain_http) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        };
        let sticky = match (self.sticky, self.no_sticky) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        };
        if plain.is_none() && sticky.is_none() {
            return None;
        }
        let flag = |name: &str| current[name].as_bool().unwrap_or(false);
        let plain = plain.unwrap_or_else(|| flag("allow_plain_http"));
        Some(json!({
            "redirect_https": !plain,
            "allow_plain_http": plain,
            "sticky": sticky.unwrap_or_else(|| flag("sticky")),
        }))
    }
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum ModeArg {
    Terminate,
    Passthrough,
}

impl ModeArg {
    fn as_str(self) -> &'static str {
        match self {
            ModeArg::Terminate => "terminate",
            ModeArg::Passthrough => "passthrough",
        }
    }
}

/// The admin API over HTTP or HTTPS.
struct ApiClient {
    base: String,
    token: String,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl ApiClient {
    fn new(base: &str, token: Option<String>, cacert: Option<&Path>) -> anyhow::Result<Self> {
        let base = base.trim_end_matches('/').to_string();
        let https = base.starts_with("https://");
        if !https && !base.starts_with("http://") {
            bail!("--api must be an http:// or https:// URL of the API listener, got `{base}`");
        }
        if !https && let Some(ca) = cacert {
            bail!(
                "--cacert {} is for https:// API URLs, but --api is `{base}`",
                ca.display()
            );
        }
        let token = token
            .filter(|t| !t.trim().is_empty())
            .context("no token: pass --token or set MESHGATE_TOKEN")?;
        if let Some(warning) = cleartext_warning(&base) {
            eprintln!("{warning}");
        }
        Ok(ApiClient {
            base,
            token,
            client: Client::builder(TokioExecutor::new()).build(connector(https, cacert)?),
        })
    }

    /// One request; `Ok((status, json))` for any HTTP answer.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let url = format!("{}{path}", self.base);
        let bytes = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
        let req = Request::builder()
            .method(method)
            .uri(&url)
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", self.token.trim()),
            )
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes))
            .with_context(|| format!("invalid URL {url}"))?;
        let resp = tokio::time::timeout(Duration::from_secs(30), self.client.request(req))
            .await
            .with_context(|| format!("{url}: no answer within 30 s"))?
            .with_context(|| {
                let hint = if self.base.starts_with("http://") {
                    " (if the API listener uses TLS, use an https:// URL)"
                } else {
                    ""
                };
                format!("cannot reach the reservations API at {url}{hint}")
            })?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .with_context(|| format!("{url}: reading the answer"))?
            .to_bytes();
        let value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).unwrap_or_else(
                |_| json!({"error": {"field": "", "reason": String::from_utf8_lossy(&body)}}),
            )
        };
        Ok((status, value))
    }

    /// Like [`call`](Self::call) but turns an API error into an `Err` naming field and reason.
    async fn expect(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let (status, value) = self.call(method, path, body).await?;
        if status.is_success() {
            Ok(value)
        } else {
            bail!("{}", describe_error(status, &value))
        }
    }

    /// Finds which collection `target` lives in: a bare label is a name; a dotted host is a
    /// domain, or a name given as `<name>.<farmer domain>`.
    async fn locate(&self, target: &str) -> anyhow::Result<(String, Value)> {
        let target = target.trim_end_matches('.').to_ascii_lowercase();
        let Some((label, _)) = target.split_once('.') else {
            let path = format!("/v1/names/{target}");
            let v = self.expect(Method::GET, &path, None).await?;
            return Ok((path, v));
        };
        let path = format!("/v1/domains/{target}");
        let (status, v) = self.call(Method::GET, &path, None).await?;
        if status.is_success() {
            return Ok((path, v));
        }
        if status == StatusCode::NOT_FOUND {
            let name_path = format!("/v1/names/{label}");
            let (s2, v2) = self.call(Method::GET, &name_path, None).await?;
            if s2.is_success() && v2["host"] == target {
                return Ok((name_path, v2));
            }
        }
        bail!("{}", describe_error(status, &v))
    }
}

/// The warning for a token about to travel in clear: an `http://` URL whose host is not
/// loopback. `None` for `https://` and for loopback (the gateway's own host).
fn cleartext_warning(base: &str) -> Option<String> {
    let uri: http::Uri = base.parse().ok()?;
    if uri.scheme_str() != Some("http") {
        return None;
    }
    let host = uri.host()?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => bare.eq_ignore_ascii_case("localhost"),
    };
    (!loopback).then(|| {
        format!(
            "warning: --admin {base} is plain HTTP to a host that is not this machine: your \
             token crosses the network in clear, and anyone on the path can reuse it. Use an \
             https:// URL (see `[admin] tls` in the gateway's configuration)."
        )
    })
}

/// An HTTP(S) connector trusting `cacert`, or the system's roots for `https://` without it.
fn connector(https: bool, cacert: Option<&Path>) -> anyhow::Result<HttpsConnector<HttpConnector>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = HttpsConnectorBuilder::new();
    let builder = match cacert {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pki_types::CertificateDer::pem_file_iter(path)
                .with_context(|| format!("--cacert {}: cannot read", path.display()))?
            {
                let cert = cert.with_context(|| format!("--cacert {}: bad PEM", path.display()))?;
                roots.add(cert).with_context(|| {
                    format!("--cacert {}: unusable certificate", path.display())
                })?;
            }
            if roots.is_empty() {
                bail!("--cacert {}: no certificate in the file", path.display());
            }
            let tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
            builder.with_tls_config(tls)
        }
        None if https => builder
            .with_provider_and_native_roots(provider)
            .context("no system CA certificates found; pass --cacert")?,
        // Plain http://: the TLS side is never used.
        None => builder.with_tls_config(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        ),
    };
    Ok(builder.https_or_http().enable_http1().build())
}

fn describe_error(status: StatusCode, v: &Value) -> String {
    let field = v["error"]["field"].as_str().unwrap_or_default();
    let reason = v["error"]["reason"].as_str().unwrap_or("no reason given");
    if field.is_empty() {
        format!("{status}: {reason}")
    } else {
        format!("{status}: {field}: {reason}")
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let api = ApiClient::new(&args.admin, args.token, args.cacert.as_deref())?;
    let out = match args.command {
        Command::Name { name, spec } => {
            let v = api
                .expect(
                    Method::POST,
                    "/v1/names",
                    Some(spec_body("name", &name, &spec)),
                )
                .await?;
            Output::Reservation(v, "reserved")
        }
        Command::Domain { fqdn, spec } => {
            let v = api
                .expect(
                    Method::POST,
                    "/v1/domains",
                    Some(spec_body("fqdn", &fqdn, &spec)),
                )
                .await?;
            Output::Reservation(v, "reserved")
        }
        Command::List { names, domains } => {
            let mut all = Vec::new();
            if !domains {
                let v = api.expect(Method::GET, "/v1/names", None).await?;
                all.extend(v["names"].as_array().cloned().unwrap_or_default());
            }
            if !names {
                let v = api.expect(Method::GET, "/v1/domains", None).await?;
                all.extend(v["domains"].as_array().cloned().unwrap_or_default());
            }
            Output::List(all)
        }
        Command::Show { target } => Output::Reservation(api.locate(&target).await?.1, ""),
        Command::Update {
            target,
            backends,
            mode,
            options,
        } => {
            let (path, current) = api.locate(&target).await?;
            let mut body = serde_json::Map::new();
            if !backends.is_empty() {
                body.insert("backends".into(), json!(backends));
            }
            if let Some(m) = mode {
                body.insert("mode".into(), json!(m.as_str()));
            }
            if let Some(o) = options.apply(&current["options"]) {
                body.insert("options".into(), o);
            }
            let v = api
                .expect(Method::PUT, &path, Some(Value::Object(body)))
                .await?;
            Output::Reservation(v, "updated")
        }
        Command::Delete { target } => {
            let (path, v) = api.locate(&target).await?;
            api.expect(Method::DELETE, &path, None).await?;
            Output::Deleted(v)
        }
        Command::Verify { fqdn } => {
            let fqdn = fqdn.trim_end_matches('.').to_ascii_lowercase();
            let v = api
                .expect(Method::POST, &format!("/v1/domains/{fqdn}/verify"), None)
                .await?;
            Output::Reservation(v, "verification requested for")
        }
        Command::Token { owner } => Output::Token(
            api.expect(Method::POST, "/v1/tokens", Some(json!({ "owner": owner })))
                .await?,
        ),
    };
    print!("{}", out.render(args.json));
    Ok(())
}

fn spec_body(field: &str, value: &str, spec: &Spec) -> Value {
    let mut body = json!({
        field: value,
        "backends": spec.backends,
        "mode": spec.mode.as_str(),
        "options": spec.options.json(),
    });
    if let Some(owner) = &spec.owner {
        body["owner"] = json!(owner);
    }
    body
}

enum Output {
    Reservation(Value, &'static str),
    List(Vec<Value>),
    Deleted(Value),
    Token(Value),
}

impl Output {
    fn render(&self, as_json: bool) -> String {
        if as_json {
            let v = match self {
                Output::Reservation(v, _) | Output::Token(v) => v.clone(),
                Output::List(items) => json!({ "reservations": items }),
                Output::Deleted(v) => json!({ "deleted": v["host"] }),
            };
            return format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        match self {
            Output::Reservation(v, verb) => describe(v, verb),
            Output::List(items) if items.is_empty() => "no reservations\n".into(),
            Output::List(items) => table(items),
            Output::Deleted(v) => format!("deleted {}\n", text(&v["host"])),
            Output::Token(v) => format!(
                "deployer token for {} (id {}); it is shown only now:\n{}\n",
                text(&v["owner"]),
                text(&v["id"]),
                text(&v["token"])
            ),
        }
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn status_text(status: &Value) -> String {
    match status["reason"].as_str() {
        Some(reason) => format!("{} ({reason})", text(&status["state"])),
        None => text(&status["state"]),
    }
}

fn backends_text(v: &Value) -> String {
    v["backends"]
        .as_array()
        .map(|b| b.iter().map(text).collect::<Vec<_>>().join(", "))
        .unwrap_or_default()
}

fn describe(v: &Value, verb: &str) -> String {
    let host = text(&v["host"]);
    let mut s = if verb.is_empty() {
        format!("{host}\n")
    } else {
        format!("{verb} {host}\n")
    };
    s += &format!(
        "  kind:     {}\n  owner:    {}\n  mode:     {}\n  backends: {}\n  status:   {}\n",
        text(&v["kind"]),
        text(&v["owner"]),
        text(&v["mode"]),
        backends_text(v),
        status_text(&v["status"]),
    );
    if let Some(err) = v["verification"]["last_error"].as_str() {
        s += &format!("  last check: {err}\n");
    }
    if v["kind"] == "domain" && v["status"]["state"] != "active" {
        let dns = &v["dns"];
        s += &format!(
            "To prove you own {host} and point it here, publish both:\n  {host}. CNAME {}.\n  {}. TXT \"{}\"\n",
            text(&dns["pointing"]["cname"]),
            text(&dns["challenge"]["name"]),
            text(&dns["challenge"]["value"]),
        );
        if let Some(addrs) = dns["pointing"]["addresses"]
            .as_array()
            .filter(|a| !a.is_empty())
        {
            let list: Vec<String> = addrs.iter().map(text).collect();
            s += &format!(
                "  (instead of the CNAME, A/AAAA records to only {} also work)\n",
                list.join(", ")
            );
        }
        s += &format!("then run `meshgate reserve verify {host}` or wait for the next check.\n");
    }
    s
}

fn table(items: &[Value]) -> String {
    let rows: Vec<[String; 5]> = items
        .iter()
        .map(|v| {
            [
                text(&v["host"]),
                text(&v["kind"]),
                text(&v["mode"]),
                status_text(&v["status"]),
                backends_text(v),
            ]
        })
        .collect();
    let header = ["HOST", "KIND", "MODE", "STATUS", "BACKENDS"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out += line.join("  ").trim_end();
        out += "\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_sent_in_clear_off_this_host_is_warned_about() {
        for remote in [
            "http://192.0.2.7:9090",
            "http://gw.example.org:9090/",
            "http://[2001:db8::1]:9090",
        ] {
            let w = cleartext_warning(remote).unwrap_or_default();
            assert!(
                w.contains("in clear") && w.contains("https://"),
                "{remote}: {w}"
            );
        }
        for local in [
            "http://127.0.0.1:9090",
            "http://127.8.9.10:9090",
            "http://[::1]:9090",
            "http://localhost:9090",
            "https://gw.example.org:9090",
        ] {
            assert_eq!(cleartext_warning(local), None, "{local}");
        }
    }
}
