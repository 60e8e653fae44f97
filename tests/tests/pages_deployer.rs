//! The deployers' page in headless Chromium, from a running gateway: the deployer types its
//! token (never in the URL), then sees its name with its request and error counts, and its
//! custom domain with the exact DNS records to publish (as the API gives them), each with a
//! copy button, and why the last DNS check failed. Saves a screenshot under
//! `target/screenshots/`.

mod pages;

use meshgate_testkit::browser::{Browser, screenshot_path};
use pages::{RealGateway, blocking, call, call_json};
use serde_json::{Value, json};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployer_page_shows_reservations_records_and_the_failed_check() {
    // Nothing answers DNS on port 9 of loopback: every proof check fails, with a reason.
    let body = "[security]\nallow_private_backends = true\n\
                [reservations]\nnameservers = [\"127.0.0.1:9\"]\nquery_timeout_ms = 300\n\
                public_addresses = [\"192.0.2.10\"]\n";
    let gw = RealGateway::start("domains = [\"farm.test\"]", body, true).await;
    let api = gw.api.expect("the deployers' listener");
    let admin = gw.admin_token();
    let (s, v) = call_json(
        api,
        "POST",
        "/v1/tokens",
        &admin,
        Some(&json!({"owner": "alice"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let token = v["token"].as_str().unwrap().to_string();
    let (s, v) = call_json(
        api,
        "POST",
        "/v1/names",
        &token,
        Some(&json!({"name": "shop", "backends": ["10.255.255.1:8080"],
                     "options": {"allow_plain_http": true, "redirect_https": false}})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (s, domain) = call_json(
        api,
        "POST",
        "/v1/domains",
        &token,
        Some(&json!({"fqdn": "blog.alice.test", "backends": ["10.255.255.1:8080"]})),
    )
    .await;
    assert_eq!(s, 201, "{domain}");
    let txt_name = domain["dns"]["challenge"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let txt_value = domain["dns"]["challenge"]["value"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(txt_name, "_meshgate-challenge.blog.alice.test");

    // Traffic on the name once it is routed (within a second of its creation).
    meshgate_testkit::eventually_async(Duration::from_secs(5), "shop routed", || async {
        let (_, v) = call_json(api, "GET", "/v1/routes", &token, None).await;
        v["routes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r["host"] == "shop.farm.test" && r["served"] == true)
    })
    .await;
    for _ in 0..3 {
        call(gw.http, "GET", "shop.farm.test", "/", None, None).await;
    }
    let (_, v) = call_json(api, "GET", "/v1/routes", &token, None).await;
    let shop = v["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["host"] == "shop.farm.test")
        .unwrap();
    assert_eq!(shop["traffic"]["requests_total"], 3, "{shop}");
    let errors = shop["traffic"]["errors_total"].as_u64().unwrap();

    let url = format!("http://{api}/");
    let mut browser = blocking(|| Browser::launch().expect("chromium starts"));
    blocking(|| {
        browser.viewport(390, 844, true).expect("phone viewport");
        browser.navigate(&url).expect("page loads");
        browser
            .wait_for(
                "!!document.getElementById('token-form')",
                Duration::from_secs(10),
            )
            .expect("sign-in form");
        // Typed in and submitted as a deployer would (script, not the URL).
        browser
            .eval(&format!(
                "document.getElementById('token').value = {}; \
                 document.getElementById('token-form').requestSubmit(); true",
                Value::from(token.as_str())
            ))
            .expect("submit the token");
        browser
            .wait_for(
                "document.body.dataset.loaded === 'true'",
                Duration::from_secs(10),
            )
            .expect("reservations rendered");
        let href = browser.eval("location.href").unwrap();
        assert_eq!(href, Value::from(url.as_str()), "the URL carries nothing");
        let who = browser
            .eval("document.getElementById('who').textContent")
            .unwrap();
        assert_eq!(who, "signed in as alice");

        let row = browser
            .eval("document.querySelector('[data-name=\"shop\"]')?.textContent")
            .unwrap();
        assert!(row.as_str().unwrap().contains("shop.farm.test"), "{row}");
        // Requests and errors of the name's route (refreshed every 10 s).
        let counts = browser
            .wait_for(
                "(() => { const r = document.querySelector('[data-name=\"shop\"]'); \
                 const n = +r.querySelector('.requests').textContent, e = +r.querySelector('.errors').textContent; \
                 return n === 3 && [n, e]; })()",
                Duration::from_secs(25),
            )
            .expect("request and error counts");
        assert_eq!(counts, json!([3, errors]));

        // The domain's records, exactly as the API gives them, each with a copy button.
        let records = browser
            .eval(
                "[...document.querySelectorAll('[data-domain=\"blog.alice.test\"] tr.record')].map(r => \
                 [r.dataset.type, r.querySelector('.record-name').textContent, \
                  r.querySelector('.record-value').textContent, r.querySelectorAll('button.copy').length])",
            )
            .unwrap();
        assert_eq!(
            records,
            json!([
                ["TXT", txt_name, txt_value, 2],
                ["CNAME", "blog.alice.test", "farm.test", 2],
                ["A", "blog.alice.test", "192.0.2.10", 2],
            ])
        );
        let state = browser
            .eval("document.querySelector('[data-domain=\"blog.alice.test\"] .verification').textContent")
            .unwrap();
        assert_eq!(state, "pending");
        // The verifier's first check fails (no name server answers); the page says why.
        let failed = browser
            .wait_for(
                "document.querySelector('[data-domain=\"blog.alice.test\"] .last-error')?.textContent",
                Duration::from_secs(30),
            )
            .expect("the failed check's reason");
        assert!(
            failed.as_str().unwrap().starts_with("Last check failed: "),
            "{failed}"
        );
        browser
            .screenshot(&screenshot_path("pages-deployer.png"))
            .expect("screenshot");
        // The token is kept in this tab only.
        let kept = browser
            .eval("sessionStorage.getItem('meshgate-deployer-token')")
            .unwrap();
        assert_eq!(kept, Value::from(token.as_str()));
    });
    assert!(
        std::fs::metadata(screenshot_path("pages-deployer.png"))
            .unwrap()
            .len()
            > 1000
    );
}
