//! `meshgate demo`: a gateway, a workload overlay node and a sample HTTP service on loopback,
//! connected through the overlay, with a local CA. The name is reserved the way a deployer
//! does it: a deployer token, then `hello` reserved through the reservations API with the
//! workload's overlay address as backend, which the gateway accepts because the workload
//! node consents (its `[consent] allow` lists the host). Prints a URL and a `curl` command
//! that works as printed; Ctrl-C stops everything and removes the demo's files.

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use meshgate::app::consent::serve_on_stack;
use meshgate::app::process::{init_logging, shutdown_signal};
use meshgate::app::{self, GatewaySetup};
use meshgate_config::gateway::GatewayConfig;
use meshgate_config::node::ConsentGrant;
use meshgate_gateway::Gateway;
use meshgate_gateway::listen::Bound;
use meshgate_gateway::upstream::overlay::EmbeddedNode;
use meshgate_overlay::NodeConfig;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The farmer's domain of the demo (`.test` is reserved: it never leaks to real DNS).
pub const DEMO_DOMAIN: &str = "meshgate.test";
/// The name the demo's deployer reserves under it.
pub const DEMO_NAME: &str = "hello";
/// The host the demo serves.
pub const DEMO_HOST: &str = "hello.meshgate.test";
/// The demo's deployer.
const DEMO_DEPLOYER: &str = "demo";
const WORKLOAD_PORT: u16 = 8080;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// HTTPS port on 127.0.0.1 (0 = any free port).
    #[arg(long, default_value_t = 8443)]
    pub port: u16,
}

pub async fn run(args: Args) -> Result<()> {
    init_logging();
    let dir = std::env::temp_dir().join(format!("meshgate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run_in(&dir, args).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(dir: &std::path::Path, args: Args) -> Result<()> {
    // 1. The sample service, on a loopback port only the workload node knows.
    let service = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let service_addr = service.local_addr()?;
    tokio::spawn(serve_sample(service));

    // 2. The workload node: an overlay node exposing the service on overlay port 8080.
    let workload = EmbeddedNode::start_with(NodeConfig {
        key_path: dir.join("workload.key"),
        listen: Some("127.0.0.1:0".parse()?),
        ..NodeConfig::default()
    })
    .await?;
    let workload_link = workload
        .node
        .listen_addr()
        .context("workload node has no link listener")?;
    let _exposed = meshgate_sockets::expose(&workload.stack, WORKLOAD_PORT, service_addr)?;
    let backend = SocketAddr::from((workload.node.address(), WORKLOAD_PORT));
    // Its consent: what `[consent] allow = [{ host = "hello.meshgate.test" }]` in its node.toml
    // gives a `meshgate node`.
    let consent = vec![ConsentGrant {
        host: Some(DEMO_HOST.to_string()),
        owner: None,
        ports: vec![WORKLOAD_PORT],
    }];
    let (_consent_tx, allow) = tokio::sync::watch::channel(Arc::new(consent));
    let _consent = serve_on_stack(&workload.stack, allow, 16)?;

    // 3. The gateway with its own overlay node, peered with the workload node.
    let gw_node = EmbeddedNode::start_with(NodeConfig {
        key_path: dir.join("gateway.key"),
        listen: None,
        peers: vec![workload_link],
        ..NodeConfig::default()
    })
    .await?;
    let config_text = format!(
        r#"domains = ["{DEMO_DOMAIN}"]
data_dir = "{dir}"
[listen]
https = ["127.0.0.1:{port}"]
http = []
[admin]
listen = "127.0.0.1:0"
[api]
listen = "127.0.0.1:0"
[tls.dev_ca]
dir = "{dir}/ca"
[reservations]
# No custom domains in the demo: the verifier never asks DNS.
nameservers = ["127.0.0.1:53"]
"#,
        dir = dir.display(),
        port = args.port,
    );
    let config_path = dir.join("gateway.toml");
    std::fs::write(&config_path, &config_text)?;
    let config = GatewayConfig::parse(&config_path, &config_text)?;
    let app = app::gateway(GatewaySetup {
        config_path: Some(config_path),
        node: Some(gw_node),
        ..GatewaySetup::new(config)
    })
    .await?;
    let gateway = &app.gateway;
    let gw_node = app.node.as_ref().context("the demo gateway has its node")?;
    let bound = match gateway.bind() {
        Ok(b) => b,
        Err(e) if args.port != 0 => {
            tracing::warn!("port {} busy ({e:#}); using a free port", args.port);
            let mut cfg = GatewayConfig::parse(std::path::Path::new("demo"), &config_text)?;
            cfg.listen.https = vec!["127.0.0.1:0".parse()?];
            gateway.apply(cfg)?;
            rebind_any(gateway)?
        }
        Err(e) => return Err(e),
    };
    let https = bound
        .https
        .first()
        .context("no https listener")?
        .local_addr()?;
    let admin = bound.admin.local_addr()?;
    let token_file = dir.join("admin.token");

    // 4. Wait until the overlay carries a stream end to end.
    wait_for_overlay(gw_node, backend).await?;

    // 5. The deployer's flow: a token from the farmer, then the reservation, which the
    // gateway accepts only once the workload node confirms its consent over the overlay.
    let api = &app
        .reservations
        .as_ref()
        .context("the demo gateway has reservations")?
        .api;
    let admin_token = std::fs::read_to_string(&token_file)?;
    let token = call_api(
        api,
        "/v1/tokens",
        admin_token.trim(),
        serde_json::json!({ "owner": DEMO_DEPLOYER }),
    )
    .await?;
    let token = token["token"].as_str().context("a deployer token")?;
    call_api(
        api,
        "/v1/names",
        token,
        serde_json::json!({ "name": DEMO_NAME, "backends": [backend.to_string()] }),
    )
    .await?;
    wait_for_route(gateway).await?;
    let ca = dir.join("ca").join("ca.pem");
    let port = https.port();
    println!();
    println!("meshgate demo is running: gateway → overlay → workload, all on loopback.");
    println!("  gateway  https://{DEMO_HOST}:{port}/  (TLS from a local CA)");
    println!(
        "  overlay  gateway node {} ⇄ workload node {}",
        gw_node.node.address(),
        workload.node.address()
    );
    println!("  workload {backend} (overlay) → sample service {service_addr}");
    println!(
        "  reserved {DEMO_NAME} by deployer `{DEMO_DEPLOYER}`; the workload node consents to {DEMO_HOST}"
    );
    println!("  metrics  http://{admin}/metrics   status http://{admin}/status");
    println!(
        "  reload   curl -X POST -H \"Authorization: Bearer $(cat {})\" http://{admin}/reload",
        token_file.display()
    );
    println!();
    println!("URL: https://{DEMO_HOST}:{port}/");
    println!("Try:");
    println!(
        "curl --cacert {} --resolve {DEMO_HOST}:{port}:127.0.0.1 https://{DEMO_HOST}:{port}/",
        ca.display()
    );
    println!();
    println!("Press Ctrl-C to stop.");
    gateway.serve(bound, shutdown_signal()).await?;
    println!("stopping the demo");
    app.shutdown().await;
    workload.shutdown().await;
    Ok(())
}

/// One POST to the reservations API, answered in-process; the JSON answer, or an error with
/// the API's reason.
async fn call_api(
    api: &meshgate_gateway::admin::api::Api,
    path: &str,
    token: &str,
    body: serde_json::Value,
) -> Result<serde_json::Value> {
    let req = Request::post(path)
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Full::new(Bytes::from(body.to_string())))?;
    let resp = api.handle_request(req).await;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    anyhow::ensure!(status.is_success(), "POST {path}: {status}: {value}");
    Ok(value)
}

/// Waits until the reserved name is in the gateway's route table.
async fn wait_for_route(gateway: &Gateway) -> Result<()> {
    let mut routes = gateway.watch_routes();
    let has =
        |t: &meshgate_gateway::routes::RouteTable| t.entries().any(|e| e.route.host == DEMO_HOST);
    tokio::time::timeout(Duration::from_secs(10), routes.wait_for(|t| has(t)))
        .await
        .context("the reservation did not reach the route table in 10 s")?
        .context("the gateway stopped")?;
    Ok(())
}

fn rebind_any(gateway: &Gateway) -> Result<Bound> {
    // `apply` does not rebind; bind the new listener set directly.
    gateway.bind_listeners(&["127.0.0.1:0".parse()?])
}

async fn wait_for_overlay(node: &EmbeddedNode, backend: SocketAddr) -> Result<()> {
    let SocketAddr::V6(v6) = backend else {
        anyhow::bail!("overlay address is IPv6");
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout(Duration::from_secs(2), node.stack.connect(v6)).await {
            Ok(Ok(_)) => return Ok(()),
            _ if tokio::time::Instant::now() > deadline => {
                anyhow::bail!("the overlay did not connect the gateway to the workload in 20 s")
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn serve_sample(listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let svc = service_fn(|req: Request<Incoming>| async move {
                let header = |n: &str| {
                    req.headers()
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_string()
                };
                let body = format!(
                    "Hello from a meshgate workload!\nYou asked for {} {} on {}, from {} over {}.\n",
                    req.method(),
                    req.uri().path(),
                    header("host"),
                    header("x-forwarded-for"),
                    header("x-forwarded-proto"),
                );
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
