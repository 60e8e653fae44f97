//! The operator's status page in headless Chromium, from a running gateway: route names,
//! backends up, then one marked down after its backend is stopped; traffic charts drawn;
//! readable on a phone-sized screen (no sideways scrolling). Saves a screenshot under
//! `target/screenshots/`.

mod pages;

use meshgate_testkit::browser::{Browser, screenshot_path};
use meshgate_testkit::http::fixed_backend;
use pages::{RealGateway, blocking, call};
use serde_json::Value;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_page_shows_routes_and_a_stopped_backend_as_down() {
    let mut alpha = fixed_backend("alpha").await;
    let beta = fixed_backend("beta").await;
    let (a, b) = (alpha.addr(), beta.addr());
    // Active TCP probes every 200 ms: a stopped backend is down after two failed probes.
    let routes = format!(
        "[security]\nallow_private_backends = true\n\
         [[route]]\nhost = \"alpha.test\"\nbackends = [{{ addr = \"{a}\" }}]\n\
         options = {{ allow_plain_http = true, redirect_https = false }}\n\
         [route.pool.active]\nkind = \"tcp\"\ninterval_ms = 200\ntimeout_ms = 200\nfall = 2\n\
         [[route]]\nhost = \"beta.test\"\nbackends = [{{ addr = \"{b}\" }}]\n\
         options = {{ allow_plain_http = true, redirect_https = false }}\n"
    );
    let gw = RealGateway::start("", &routes, false).await;
    for _ in 0..5 {
        let (status, body) = call(gw.http, "GET", "alpha.test", "/", None, None).await;
        assert_eq!((status, body.as_str()), (200, "alpha"));
    }
    let url = format!("http://{}/", gw.admin);
    let backend = |addr: std::net::SocketAddr| {
        format!("document.querySelector('[data-backend=\"{addr}\"]')?.dataset.state")
    };

    let mut browser = blocking(|| Browser::launch().expect("chromium starts"));
    blocking(|| {
        browser.viewport(390, 844, true).expect("phone viewport");
        browser.navigate(&url).expect("page loads");
        let names = browser
            .wait_for(
                "document.body.dataset.loaded && [...document.querySelectorAll('[data-route] .route-name')].map(e => e.textContent).join(',')",
                Duration::from_secs(15),
            )
            .expect("routes rendered");
        assert_eq!(names, Value::from("alpha.test,beta.test"));
        assert_eq!(
            browser
                .wait_for(&backend(a), Duration::from_secs(10))
                .unwrap(),
            "up"
        );
        assert_eq!(browser.eval(&backend(b)).unwrap(), "up");
        // The five requests are in alpha's totals and its chart has both lines.
        let totals = browser
            .wait_for(
                "document.querySelector('[data-route=\"alpha.test\"] .muted')?.textContent.includes('5 requests') && document.querySelector('[data-route=\"alpha.test\"] .muted').textContent",
                Duration::from_secs(10),
            )
            .expect("alpha's totals");
        assert!(totals.as_str().unwrap().contains("0 errors"), "{totals}");
        let lines = browser
            .eval("document.querySelectorAll('[data-route=\"alpha.test\"] svg.chart polyline').length")
            .unwrap();
        assert_eq!(lines, 2);
        // Readable on a phone: nothing wider than the screen.
        let overflow = browser
            .eval("document.documentElement.scrollWidth - window.innerWidth")
            .unwrap();
        assert!(
            overflow.as_i64().unwrap() <= 0,
            "page scrolls sideways by {overflow}px"
        );
    });

    alpha.kill().await;

    blocking(|| {
        let state = browser.wait_for(
            &format!("{} === 'down' && 'down'", backend(a)),
            Duration::from_secs(20),
        );
        assert_eq!(state.expect("alpha marked down"), "down");
        let word = browser
            .eval(&format!(
                "document.querySelector('[data-backend=\"{a}\"] .state').textContent"
            ))
            .unwrap();
        assert!(word.as_str().unwrap().starts_with("down"), "{word}");
        assert_eq!(browser.eval(&backend(b)).unwrap(), "up", "beta stays up");
        browser
            .screenshot(&screenshot_path("pages-operator.png"))
            .expect("screenshot");
    });
    let png = std::fs::metadata(screenshot_path("pages-operator.png")).expect("screenshot saved");
    assert!(png.len() > 1000);
    drop(beta);
}
