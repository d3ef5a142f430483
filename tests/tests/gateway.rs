//! The checkout over HTTP/JSON with curl, through `shop-gateway` in front
//! of the five services: a customer's checkout end to end, errors as
//! problem details, the OpenAPI document, and the order details staying
//! partly available while the payment service is out of reach, its circuit
//! opening and then closing again through half-open.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value as Json, json};
use shop_gateway::upstream::CallSettings;
use shop_server::auth::{AuthSettings, LocalTokens};
use shop_tests::{Proxy, eventually};
use support::{Options, System};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(60);
const SECRET: &str = "a test secret of at least thirty-two bytes";

/// What curl saw: the status, the headers (lower-case names) and the body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Json,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Runs curl as a user would: `curl -X METHOD -H 'authorization: Bearer …'
/// -d BODY URL`.
async fn curl(method: &str, url: &str, token: Option<&str>, body: Option<Json>) -> Result<Answer> {
    let mut command = tokio::process::Command::new("curl");
    command.args(["-sS", "-i", "--max-time", "30", "-X", method, url]);
    if let Some(token) = token {
        command.args(["-H", &format!("authorization: Bearer {token}")]);
    }
    if let Some(body) = body {
        command.args([
            "-H",
            "content-type: application/json",
            "-d",
            &body.to_string(),
        ]);
    }
    let output = command.output().await.context("failed to run curl")?;
    anyhow::ensure!(
        output.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP head")?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .context("no status line")?
        .parse()?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim().to_lowercase(), value.trim().to_owned()))
        .collect();
    let body = if body.trim().is_empty() {
        Json::Null
    } else {
        serde_json::from_str(body).with_context(|| format!("not JSON: {body}"))?
    };
    Ok(Answer {
        status,
        headers,
        body,
    })
}

struct Gateway {
    url: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<()>>,
}

async fn gateway(system: &System, payment: SocketAddr) -> Result<Gateway> {
    let url = |addr: SocketAddr| vec![format!("http://{addr}")];
    let app = shop_gateway::build(shop_gateway::Settings {
        addr: "127.0.0.1:0".parse()?,
        order_url: url(system.order_addr),
        inventory_url: url(system.inventory_addr),
        payment_url: url(payment),
        notification_url: url(system.notification_addr),
        user_url: url(system.user_addr),
        metrics_addr: None,
        drain_timeout: Duration::from_secs(2),
        max_streams: 100,
        log_json: false,
        calls: CallSettings {
            call_timeout: Duration::from_secs(3),
            read_retries: 1,
            retry_backoff: Duration::from_millis(50),
            breaker_failures: 2,
            breaker_cooldown: Duration::from_secs(1),
        },
    })
    .await?;
    let url = format!("http://{}", app.addr());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    Ok(Gateway {
        url,
        shutdown,
        task,
    })
}

/// Over HTTP: staff creates a product `sku`, a new customer registers and
/// orders one, retried until the order service has heard of both. Returns
/// the customer's token and the order id.
async fn one_order(gateway: &Gateway, tokens: &LocalTokens, sku: &str) -> Result<(String, String)> {
    let api = |path: &str| format!("{}{path}", gateway.url);
    let customer = Uuid::new_v4();
    let token = tokens.customer(customer);
    let created = curl(
        "POST",
        &api("/v1/products"),
        Some(&tokens.staff("ops")),
        Some(json!({
            "sku": sku,
            "name": sku,
            "unitPrice": { "amountMinor": "4200", "currency": "EUR" },
            "initialStock": 3
        })),
    )
    .await?;
    let product = created.body["product"]["productId"]
        .as_str()
        .context("no product")?
        .to_owned();
    curl(
        "POST",
        &api("/v1/users"),
        Some(&token),
        Some(json!({ "name": "Grace", "email": "grace@example.com" })),
    )
    .await?;
    let order = eventually(TIMEOUT, "the order to be accepted", || async {
        let placed = curl(
            "POST",
            &api("/v1/orders"),
            Some(&token),
            Some(json!({
                "customerId": customer.to_string(),
                "lines": [{ "productId": product, "quantity": 1 }],
                "idempotencyKey": sku
            })),
        )
        .await?;
        Ok((placed.status == 200).then_some(placed.body))
    })
    .await?;
    let order_id = order["order"]["orderId"]
        .as_str()
        .context("no order id")?
        .to_owned();
    Ok((token, order_id))
}

async fn circuit(gateway: &Gateway, service: &str) -> Result<String> {
    let health = curl("GET", &format!("{}/health", gateway.url), None, None).await?;
    Ok(health.body["circuits"][service]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

#[tokio::test]
async fn a_customer_checks_out_with_curl_and_the_details_survive_a_payment_outage() -> Result<()> {
    let system = System::start_with(Options {
        auth_secret: Some(SECRET.into()),
        ..Options::default()
    })
    .await?;
    let tokens = LocalTokens::new(&AuthSettings::shared_secret(SECRET))?;
    let payment = Proxy::start(system.payment_addr).await?;
    let gateway = gateway(&system, payment.addr()).await?;
    let api = |path: &str| format!("{}{path}", gateway.url);
    let staff = tokens.staff("ops");
    let customer = Uuid::new_v4();
    let token = tokens.customer(customer);

    // The catalog, by staff; the customer registers.
    let created = curl(
        "POST",
        &api("/v1/products"),
        Some(&staff),
        Some(json!({
            "sku": "CURL-1",
            "name": "Curl mug",
            "unitPrice": { "amountMinor": "1250", "currency": "EUR" },
            "initialStock": 5
        })),
    )
    .await?;
    assert_eq!(created.status, 200, "{created:?}");
    let product = created.body["product"]["productId"]
        .as_str()
        .context("no product id")?
        .to_owned();
    let registered = curl(
        "POST",
        &api("/v1/users"),
        Some(&token),
        Some(json!({ "name": "Ada Lovelace", "email": "ada@example.com" })),
    )
    .await?;
    assert_eq!(registered.status, 200, "{registered:?}");
    assert_eq!(registered.body["user"]["userId"], customer.to_string());

    // Errors a user sees: problem details naming what is wrong.
    let bad = curl(
        "POST",
        &api("/v1/orders"),
        Some(&token),
        Some(json!({
            "customerId": customer.to_string(),
            "lines": [{ "productId": product, "quantity": 0 }],
            "idempotencyKey": "curl-bad"
        })),
    )
    .await?;
    assert_eq!(bad.status, 400, "{bad:?}");
    assert_eq!(bad.header("content-type"), Some("application/problem+json"));
    assert_eq!(bad.body["code"], "INVALID_ARGUMENT");
    assert_eq!(bad.body["violations"][0]["field"], "lines[0].quantity");
    let unknown = curl(
        "POST",
        &api("/v1/orders"),
        Some(&token),
        Some(json!({ "customerId": customer.to_string(), "coupon": "FREE" })),
    )
    .await?;
    assert_eq!(unknown.status, 400, "{unknown:?}");
    assert!(
        unknown.body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("coupon")
    );
    let anonymous = curl(
        "GET",
        &api("/v1/orders/00000000-0000-0000-0000-000000000000"),
        None,
        None,
    )
    .await?;
    assert_eq!(anonymous.status, 401, "{anonymous:?}");
    assert_eq!(anonymous.body["code"], "UNAUTHENTICATED");

    // The order, placed once the order service has heard of the customer
    // and the product.
    let order = eventually(TIMEOUT, "the order to be accepted", || async {
        let placed = curl(
            "POST",
            &api("/v1/orders"),
            Some(&token),
            Some(json!({
                "customerId": customer.to_string(),
                "lines": [{ "productId": product, "quantity": 2 }],
                "idempotencyKey": "curl-1"
            })),
        )
        .await?;
        match placed.status {
            200 => Ok(Some(placed.body)),
            404 => Ok(None),
            _ => anyhow::bail!("unexpected answer {placed:?}"),
        }
    })
    .await?;
    let order_id = order["order"]["orderId"]
        .as_str()
        .context("no order id")?
        .to_owned();
    assert_eq!(
        order["order"]["total"],
        json!({ "amountMinor": "2500", "currency": "EUR" })
    );
    let confirmed = eventually(TIMEOUT, "the order to be confirmed", || async {
        let got = curl(
            "GET",
            &api(&format!("/v1/orders/{order_id}")),
            Some(&token),
            None,
        )
        .await?;
        Ok((got.body["order"]["status"] == "ORDER_STATUS_CONFIRMED").then_some(got))
    })
    .await?;
    assert_eq!(confirmed.status, 200);
    let stranger = tokens.customer(Uuid::new_v4());
    let hidden = curl(
        "GET",
        &api(&format!("/v1/orders/{order_id}")),
        Some(&stranger),
        None,
    )
    .await?;
    assert_eq!(hidden.status, 404, "{hidden:?}");

    // The details: all parts once the notification has been sent.
    let details_url = api(&format!("/v1/orders/{order_id}/details"));
    let details = eventually(TIMEOUT, "the confirmation to be notified", || async {
        let details = curl("GET", &details_url, Some(&token), None).await?;
        let notified = details.body["notifications"]
            .as_array()
            .is_some_and(|all| !all.is_empty());
        Ok(notified.then_some(details))
    })
    .await?;
    assert_eq!(details.status, 200);
    assert_eq!(details.body["partial"], false);
    assert_eq!(details.body["order"]["status"], "ORDER_STATUS_CONFIRMED");
    assert_eq!(
        details.body["payment"]["status"],
        "PAYMENT_STATUS_SUCCEEDED"
    );
    assert_eq!(details.body["stock"][0]["onHand"], 3);
    assert_eq!(circuit(&gateway, "payment").await?, "closed");

    // The payment service out of reach: the rest of the details still come,
    // marked partial; failures open the payment circuit.
    payment.cut();
    let partial = curl("GET", &details_url, Some(&token), None).await?;
    assert_eq!(partial.status, 200, "{partial:?}");
    assert_eq!(partial.body["partial"], true);
    assert_eq!(partial.body["order"]["status"], "ORDER_STATUS_CONFIRMED");
    assert!(partial.body.get("payment").is_none(), "{partial:?}");
    assert_eq!(partial.body["missing"][0]["part"], "payment");
    assert_eq!(partial.body["missing"][0]["problem"]["status"], 503);
    eventually(TIMEOUT, "the payment circuit to open", || async {
        curl("GET", &details_url, Some(&token), None).await?;
        Ok((circuit(&gateway, "payment").await? == "open").then_some(()))
    })
    .await?;
    let refused = curl(
        "GET",
        &api(&format!("/v1/orders/{order_id}/payment")),
        Some(&token),
        None,
    )
    .await?;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(refused.header("retry-after"), Some("5"));
    assert!(
        refused.body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("circuit open")
    );
    let health = curl("GET", &api("/health"), None, None).await?;
    assert_eq!(health.body["status"], "degraded");

    // Back: after the cooldown the circuit lets a probe through, which
    // closes it.
    payment.restore();
    eventually(TIMEOUT, "the payment circuit to be half-open", || async {
        Ok((circuit(&gateway, "payment").await? == "half-open").then_some(()))
    })
    .await?;
    let recovered = curl("GET", &details_url, Some(&token), None).await?;
    assert_eq!(recovered.body["partial"], false, "{recovered:?}");
    assert_eq!(
        recovered.body["payment"]["status"],
        "PAYMENT_STATUS_SUCCEEDED"
    );
    assert_eq!(circuit(&gateway, "payment").await?, "closed");

    // The contract, for tools.
    let openapi = curl("GET", &api("/openapi.json"), None, None).await?;
    assert_eq!(openapi.body["openapi"], "3.1.0");
    assert!(openapi.body["paths"]["/v1/orders"]["post"].is_object());

    gateway.shutdown.cancel();
    gateway.task.await??;
    system.stop().await
}

#[tokio::test]
async fn a_watch_streams_the_order_as_server_sent_events_until_it_is_confirmed() -> Result<()> {
    let system = System::start_with(Options {
        auth_secret: Some(SECRET.into()),
        ..Options::default()
    })
    .await?;
    let tokens = LocalTokens::new(&AuthSettings::shared_secret(SECRET))?;
    let gateway = gateway(&system, system.payment_addr).await?;
    let api = |path: &str| format!("{}{path}", gateway.url);
    let (token, order_id) = one_order(&gateway, &tokens, "SSE-1").await?;

    // curl -N follows the stream until the server ends it, after the
    // terminal status.
    let output = tokio::process::Command::new("curl")
        .args(["-sS", "-N", "--max-time", "60"])
        .args(["-H", &format!("authorization: Bearer {token}")])
        .arg(api(&format!("/v1/orders/{order_id}/watch")))
        .output()
        .await?;
    let text = String::from_utf8(output.stdout)?;
    let updates: Vec<Json> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let statuses: Vec<&str> = updates
        .iter()
        .filter_map(|update| update["order"]["status"].as_str())
        .collect();
    assert_eq!(statuses.last(), Some(&"ORDER_STATUS_CONFIRMED"), "{text}");
    assert!(text.contains("event: message"), "{text}");

    gateway.shutdown.cancel();
    gateway.task.await??;
    system.stop().await
}

/// Counts the pixels of a PNG screenshot that have exactly `rgb`.
fn pixels_of(png_path: &std::path::Path, rgb: [u8; 3]) -> Result<(u32, u32, usize)> {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(png_path)?));
    let mut reader = decoder.read_info()?;
    let mut buffer = vec![0; reader.output_buffer_size().context("image too large")?];
    let info = reader.next_frame(&mut buffer)?;
    let channels = info.color_type.samples();
    anyhow::ensure!(
        channels >= 3,
        "unexpected colour type {:?}",
        info.color_type
    );
    let count = buffer[..info.buffer_size()]
        .chunks(channels)
        .filter(|pixel| pixel[..3] == rgb)
        .count();
    Ok((info.width, info.height, count))
}

#[tokio::test]
async fn the_timeline_page_shows_a_saga_unfold_in_a_real_browser() -> Result<()> {
    use tokio::io::AsyncBufReadExt;

    let mut system = System::start_with(Options {
        auth_secret: Some(SECRET.into()),
        without_payment: true,
        ..Options::default()
    })
    .await?;
    let tokens = LocalTokens::new(&AuthSettings::shared_secret(SECRET))?;
    let gateway = gateway(&system, system.payment_addr).await?;
    let api = |path: &str| format!("{}{path}", gateway.url);
    let staff = tokens.staff("ops");
    let (token, order_id) = one_order(&gateway, &tokens, "PAGE-1").await?;

    // Customers do not see timelines; staff do, as JSON too.
    let refused = curl(
        "GET",
        &api(&format!("/v1/orders/{order_id}/timeline")),
        Some(&token),
        None,
    )
    .await?;
    assert_eq!(refused.status, 403, "{refused:?}");

    // The page, open while the saga waits for the payment service.
    let screenshot = std::env::temp_dir().join(format!("timeline-{order_id}.png"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/browser/timeline.mjs");
    let mut browser = tokio::process::Command::new("node")
        .arg(script)
        .arg(api(&format!("/orders/{order_id}/timeline#token={staff}")))
        .arg(&screenshot)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("failed to run node (the browser tests need Node.js, `npm ci --prefix tests/browser` and Chromium)")?;
    let mut lines = tokio::io::BufReader::new(browser.stdout.take().context("no stdout")?).lines();
    let mut seen = Vec::new();
    let wait = async {
        while let Some(line) = lines.next_line().await? {
            let pending = line == "status PENDING";
            seen.push(line);
            if pending {
                return anyhow::Ok(());
            }
        }
        anyhow::bail!("the page never showed PENDING: {seen:?}")
    };
    tokio::time::timeout(TIMEOUT, wait)
        .await
        .context("the page did not load")??;

    // The payment service comes: the page follows the saga to its end.
    system.start_payment().await?;
    let rest = async {
        while let Some(line) = lines.next_line().await? {
            seen.push(line);
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(120), rest)
        .await
        .context("the browser did not finish")??;
    let status = browser.wait().await?;
    assert!(status.success(), "the browser script failed: {seen:?}");
    assert!(
        !seen.iter().any(|line| line.starts_with("pageerror")),
        "{seen:?}"
    );
    assert_eq!(
        seen.last().map(String::as_str),
        Some("done CONFIRMED"),
        "{seen:?}"
    );
    let pending = seen.iter().position(|line| line == "status PENDING");
    let confirmed = seen.iter().position(|line| line == "status CONFIRMED");
    assert!(pending < confirmed, "{seen:?}");
    let rows: Vec<usize> = seen
        .iter()
        .filter_map(|line| line.strip_prefix("rows ")?.parse().ok())
        .collect();
    // OrderPlaced, InventoryReserved, PaymentSucceeded, InventoryCommitted,
    // OrderConfirmed, NotificationSent at least, appearing as they happen.
    assert!(rows.last().is_some_and(|rows| *rows >= 6), "{seen:?}");
    assert!(
        rows.len() >= 2 && rows[0] < rows[rows.len() - 1],
        "the rows did not grow while the page was open: {seen:?}"
    );

    // The screenshot: the page at its size, with the status badge in the
    // confirmed colour.
    let (width, height, green) = pixels_of(&screenshot, [0xcd, 0xec, 0xcf])?;
    assert_eq!((width, height), (1000, 700));
    assert!(green > 500, "only {green} pixels of the CONFIRMED badge");
    let _ = std::fs::remove_file(&screenshot);

    // The same timeline for a terminal.
    let timeline = curl(
        "GET",
        &api(&format!("/v1/orders/{order_id}/timeline")),
        Some(&staff),
        None,
    )
    .await?;
    assert_eq!(timeline.status, 200);
    assert_eq!(timeline.body["status"], "ORDER_STATUS_CONFIRMED");
    let placed = &timeline.body["steps"][0];
    assert_eq!(placed["eventType"], "shop.events.v1.OrderPlaced");
    assert_eq!(placed["source"], "order-service");
    let consumers: Vec<&str> = placed["handledBy"]
        .as_array()
        .context("no handlings")?
        .iter()
        .filter_map(|handling| handling["consumer"].as_str())
        .collect();
    assert!(consumers.contains(&"inventory"), "{consumers:?}");

    // And as `shop-timeline` prints it.
    let channel = |addr: SocketAddr| {
        tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .map(|endpoint| endpoint.connect_lazy())
    };
    let services = vec![
        ("order".to_owned(), channel(system.order_addr)?),
        ("inventory".to_owned(), channel(system.inventory_addr)?),
        ("payment".to_owned(), channel(system.payment_addr)?),
        (
            "notification".to_owned(),
            channel(system.notification_addr)?,
        ),
        ("user".to_owned(), channel(system.user_addr)?),
    ];
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert("authorization", format!("Bearer {staff}").parse()?);
    let gathered = shop_gateway::timeline::gather(
        services[0].1.clone(),
        &services,
        &order_id,
        &metadata,
        Duration::from_secs(10),
    )
    .await?;
    let text = shop_gateway::timeline::render(&gathered);
    let first = text.lines().nth(1).unwrap_or_default();
    assert!(
        first.contains("+     0.0 ms") && first.contains("OrderPlaced"),
        "{text}"
    );
    assert!(
        text.contains("→ inventory") && text.contains("handled after"),
        "{text}"
    );
    assert!(
        text.contains("OrderConfirmed") && text.contains("→ notification"),
        "{text}"
    );

    gateway.shutdown.cancel();
    gateway.task.await??;
    system.stop().await
}
